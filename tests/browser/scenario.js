/*
 * The interop scenario run by @stomp/stompjs against a STOMP-over-WebSocket broker, in a
 * browser page (interop.html) and in Node (node_client.mjs). It owns nothing but the
 * client's side of the conversation; tests/test_browser.py checks the outcome.
 *
 *   connect -> subscribe to options.inbox (ack: client-individual)
 *           -> publish to options.outbox: a text body, a binary body with NUL bytes, and a
 *              large text body that stompjs splits over several WebSocket messages
 *           -> receive options.expect messages, ack each one
 *           -> disconnect (with a receipt, so every frame before it was processed)
 *           -> resolve with what was received.
 *
 * Works as a classic browser script (defines window.stompScenario) and as a CommonJS
 * module (module.exports), so both peers run exactly the same code.
 */
(function (root, factory) {
  if (typeof module === 'object' && module.exports) {
    module.exports = factory();
  } else {
    root.stompScenario = factory();
  }
})(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  function run(StompJs, options) {
    return new Promise(function (resolve, reject) {
      var result = { connected: null, subprotocol: null, received: [], log: [] };
      var finished = false;
      var timer = setTimeout(function () {
        fail(new Error('scenario timed out; received ' + result.received.length));
      }, options.timeoutMs || 20000);

      function log(line) {
        if (result.log.length < 200) result.log.push(String(line).slice(0, 300));
      }
      function fail(error) {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        client.deactivate();
        error.result = result;
        reject(error);
      }

      var config = {
        reconnectDelay: 0,
        heartbeatIncoming: options.heartbeat || 0,
        heartbeatOutgoing: options.heartbeat || 0,
        // Text frames larger than this go out in several WebSocket messages.
        splitLargeFrames: true,
        maxWebSocketChunkSize: 1000,
        debug: log,
      };
      if (options.versions) {
        // accept-version of CONNECT (the WebSocket subprotocol does not choose the version)
        config.stompVersions = new StompJs.Versions(options.versions);
      }
      if (options.webSocketFactory) {
        config.webSocketFactory = options.webSocketFactory;
      } else {
        config.brokerURL = options.url;
      }
      var client = new StompJs.Client(config);

      client.onConnect = function (frame) {
        result.connected = frame.headers;
        result.subprotocol = client.webSocket ? client.webSocket.protocol : null;
        client.subscribe(
          options.inbox,
          function (message) {
            var type = message.headers['content-type'] || '';
            result.received.push({
              headers: message.headers,
              text: type.indexOf('text/') === 0 ? message.body : null,
              bytes: Array.prototype.slice.call(message.binaryBody),
            });
            message.ack();
            if (result.received.length === options.expect) {
              clearTimeout(timer);
              // deactivate() sends DISCONNECT with a receipt and waits for it: every ACK
              // and SEND before it was processed by the broker.
              client.deactivate().then(function () {
                if (!finished) {
                  finished = true;
                  resolve(result);
                }
              }, fail);
            }
          },
          { ack: 'client-individual' }
        );
        client.publish({
          destination: options.outbox,
          body: options.text,
          headers: { 'content-type': 'text/plain;charset=utf-8' },
        });
        client.publish({
          destination: options.outbox,
          binaryBody: new Uint8Array(options.binary),
          headers: { 'content-type': 'application/octet-stream' },
        });
        client.publish({
          destination: options.outbox,
          body: options.large,
          headers: { 'content-type': 'text/plain;charset=utf-8' },
        });
      };
      client.onStompError = function (frame) {
        fail(new Error('ERROR frame: ' + frame.headers.message + ' ' + frame.body));
      };
      client.onWebSocketError = function (event) {
        fail(new Error('WebSocket error: ' + (event && event.message)));
      };
      client.onWebSocketClose = function (event) {
        log('WebSocket closed: ' + event.code);
        if (!finished && result.received.length < options.expect) {
          fail(new Error('WebSocket closed early with code ' + event.code));
        }
      };
      client.activate();
    });
  }

  return { run: run };
});
