// Run scenario.js with @stomp/stompjs in Node over the `ws` package and print the outcome as
// JSON on stdout: `node node_client.mjs OPTIONS_JSON`. Exit code 0 on success.
import { createRequire } from 'node:module';
import { Client, Versions } from '@stomp/stompjs';
import WebSocket from 'ws';

const require = createRequire(import.meta.url);
const scenario = require('./scenario.js');

const options = JSON.parse(process.argv[2]);
const protocols = options.protocols || ['v12.stomp', 'v11.stomp', 'v10.stomp'];
options.webSocketFactory = () => new WebSocket(options.url, protocols);
try {
  const result = await scenario.run({ Client, Versions }, options);
  process.stdout.write(JSON.stringify({ result, error: null, userAgent: `node ${process.version}` }) + '\n');
  process.exit(0);
} catch (error) {
  process.stdout.write(
    JSON.stringify({ result: null, error: { message: String(error.message), result: error.result || null } }) + '\n'
  );
  process.exit(2);
}
