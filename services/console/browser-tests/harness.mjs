// What every browser run shares: Debian's Chromium through playwright-core,
// screenshots, and steps that print `ok NAME (ms)` or `FAIL NAME: why`.
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

/** Chromium with the flags a container needs, and a page with a screenshot helper. */
export async function launch(env) {
  mkdirSync(env.SHOTS_DIR, { recursive: true });
  const browser = await chromium.launch({
    executablePath: env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const page = await context.newPage();
  const shot = (name) => page.screenshot({ path: `${env.SHOTS_DIR}/${name}.png`, fullPage: true });
  return { browser, context, page, shot };
}

/** A step runner: `failed()` says whether one failed (the first failure throws). */
export function stepper(shot) {
  let failed = false;
  async function step(name, fn) {
    const started = Date.now();
    try {
      await fn();
      console.log(`ok   ${name} (${Date.now() - started} ms)`);
    } catch (e) {
      failed = true;
      console.log(`FAIL ${name}: ${e.message}`);
      await shot(`failed-${name.replace(/\W+/g, '-')}`).catch(() => {});
      throw e;
    }
  }
  return { step, failed: () => failed };
}
