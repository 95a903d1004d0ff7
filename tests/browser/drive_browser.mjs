// Open one page in headless Debian Chromium (never a downloaded browser) and print what it
// reports as JSON on stdout: `node drive_browser.mjs URL [TIMEOUT_MS]`.
// The page sets window.__result (success) or window.__error (failure). The browser gets a
// fresh profile directory, removed afterwards. Exit code 0 when the page succeeded.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, timeoutText] = process.argv.slice(2);
const timeout = Number(timeoutText || 30000);
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const userDataDir = mkdtempSync(join(tmpdir(), 'trio-stomp-chromium-'));
let context;
let exitCode = 1;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
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
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (message) => process.stderr.write(`[page ${message.type()}] ${message.text()}\n`));
  page.on('pageerror', (error) => process.stderr.write(`[page error] ${error}\n`));
  await page.goto(url, { timeout });
  await page.waitForFunction(() => window.__result !== undefined || window.__error !== undefined, null, {
    timeout,
  });
  const outcome = await page.evaluate(() => ({
    result: window.__result ?? null,
    error: window.__error ?? null,
    userAgent: navigator.userAgent,
  }));
  process.stdout.write(JSON.stringify(outcome) + '\n');
  exitCode = outcome.error ? 2 : 0;
} catch (error) {
  process.stderr.write(`drive_browser: ${error && error.stack ? error.stack : error}\n`);
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(exitCode);
