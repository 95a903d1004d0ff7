// Drive examples/web_chat/index.html like two people in two tabs of headless Chromium:
// `node drive_chat.mjs PAGE_URL BROKER_WS_URL ROOM`. Prints {alice: [...], bob: [...]} (the
// lines each tab shows) as JSON on stdout; exit code 0 when every expected line appeared.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [pageUrl, brokerUrl, room] = process.argv.slice(2);
const timeout = 20000;
const userDataDir = mkdtempSync(join(tmpdir(), 'trio-stomp-chromium-'));
let context;
let exitCode = 1;

async function openTab(name) {
  const page = await context.newPage();
  page.on('console', (m) => process.stderr.write(`[${name} ${m.type()}] ${m.text()}\n`));
  page.on('pageerror', (e) => process.stderr.write(`[${name} error] ${e}\n`));
  const query = new URLSearchParams({ broker: brokerUrl, room, name });
  await page.goto(`${pageUrl}?${query}`, { timeout });
  await page.click('#join button');
  await page.waitForSelector('#say input:not([disabled])', { timeout });
  return page;
}

async function say(page, text) {
  await page.fill('#say input[name=text]', text);
  await page.press('#say input[name=text]', 'Enter');
}

async function waitForLine(page, line) {
  await page.waitForFunction(
    (expected) => Array.from(document.querySelectorAll('#log p')).some((p) => p.textContent === expected),
    line,
    { timeout }
  );
}

const lines = (page) => page.$$eval('#log p', (ps) => ps.map((p) => p.textContent));

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    headless: true,
    timeout,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const alice = await openTab('alice');
  const bob = await openTab('bob');
  await waitForLine(alice, 'bob: (joined)');
  await say(alice, 'hello from alice');
  await waitForLine(bob, 'alice: hello from alice');
  await say(bob, '!upper shout, bot');
  await waitForLine(alice, 'bot: SHOUT, BOT');
  await waitForLine(bob, 'bot: SHOUT, BOT');
  await waitForLine(bob, 'bot: welcome, bob! type !help');
  process.stdout.write(JSON.stringify({ alice: await lines(alice), bob: await lines(bob) }) + '\n');
  exitCode = 0;
} catch (error) {
  process.stderr.write(`drive_chat: ${error && error.stack ? error.stack : error}\n`);
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(exitCode);
