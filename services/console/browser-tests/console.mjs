// The console in headless Chromium: sign in, see both instances of each
// service, drain one and see it leave, change a weight and see it in
// meshctl, have a bad setting refused with its reason, roll a setting back,
// sign out and be refused. Started by services/integration-tests/tests/console.rs,
// which runs the mesh and the console and passes them in the environment:
//   CONSOLE_URL, ADMIN_PASSWORD, VIEWER_PASSWORD, ADMIN_TOKEN, MESHCTL, ETCD,
//   USER_SERVICE, USER_A, USER_B, ORDER_SERVICE, ORDER_A, SHOTS_DIR, CHROMIUM
// Prints one line per step and exits non-zero at the first that fails.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { launch, stepper } from './harness.mjs';

const env = process.env;
for (const name of ['CONSOLE_URL', 'ADMIN_PASSWORD', 'VIEWER_PASSWORD', 'MESHCTL', 'ETCD', 'USER_SERVICE', 'USER_A', 'USER_B', 'ORDER_SERVICE', 'ORDER_A', 'SHOTS_DIR']) {
  assert.ok(env[name], `${name} is not set`);
}
const base = env.CONSOLE_URL;
const USER = env.USER_SERVICE;

const meshctl = (...args) => execFileSync(env.MESHCTL, ['--etcd', env.ETCD, ...args], { encoding: 'utf8' });
const lineOf = (text, id) => text.split('\n').find((l) => l.includes(id)) ?? '';

const { browser, context, page, shot } = await launch(env);
const banner = (kind) => page.locator(`.banner.${kind}`);
const row = (service, id) => page.locator(`table[data-service="${service}"] tr[data-instance="${id}"]`);
const { step, failed } = stepper(shot);

/** Reloads `url` until `check()` holds (10 s). */
async function until(what, url, check) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    await page.goto(url);
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`not within 10 s: ${what}`);
    await page.waitForTimeout(200);
  }
}

try {
  await step('a page without a session goes to sign-in', async () => {
    await page.goto(`${base}/services`);
    assert.match(page.url(), /\/login\?next=%2Fservices/);
    await shot('sign-in');
  });

  await step('a wrong password is refused', async () => {
    await page.fill('#user', 'admin');
    await page.fill('#password', 'not the password');
    await page.click('#sign-in');
    assert.match(await banner('error').innerText(), /Wrong user or password/);
  });

  await step('sign in as admin', async () => {
    await page.fill('#user', 'admin');
    await page.fill('#password', env.ADMIN_PASSWORD);
    await page.click('#sign-in');
    assert.match(page.url(), /\/services$/);
    assert.match(await page.locator('#who').innerText(), /admin · admin/);
  });

  await step('both instances of each service', async () => {
    for (const service of [USER, env.ORDER_SERVICE]) {
      assert.equal(await page.locator(`table[data-service="${service}"] tr[data-instance]`).count(), 2, service);
    }
    for (const id of [env.USER_A, env.USER_B]) {
      assert.equal(await row(USER, id).locator('td.state').innerText(), 'serving');
      assert.equal(await row(USER, id).locator('td.health').innerText(), 'serving');
    }
    await shot('services');
  });

  await step('drain one and see it leave', async () => {
    await row(USER, env.USER_A).locator('button.drain').click();
    assert.match(await banner('said').innerText(), /drained/);
    assert.equal(await row(USER, env.USER_A).locator('td.state').innerText(), 'drained');
    await until('its health says NOT_SERVING', `${base}/services`, async () =>
      (await row(USER, env.USER_A).locator('td.health').innerText()) === 'not serving');
    assert.match(await page.locator('body').innerText(), /1 in rotation of 2/);
    await shot('services-drained');
    assert.match(lineOf(meshctl('instances', USER), env.USER_A), /drained/);
    // order-service's pool of user-service drops it.
    await until('order-service stops balancing over it', `${base}/pools/${env.ORDER_A}`, async () => {
      const pool = await page.locator('table.pool').first().innerText();
      return pool.includes(env.USER_B) && !pool.includes(env.USER_A);
    });
    await shot('pools');
  });

  await step('put it back', async () => {
    await page.goto(`${base}/services`);
    await row(USER, env.USER_A).locator('button.undrain').click();
    assert.match(await banner('said').innerText(), /back in rotation/);
    await until('it serves again', `${base}/services`, async () =>
      (await row(USER, env.USER_A).locator('td.state').innerText()) === 'serving');
  });

  await step('change a weight and see it in meshctl', async () => {
    await page.goto(`${base}/services`);
    await row(USER, env.USER_B).locator('input[name=weight]').fill('250');
    await row(USER, env.USER_B).locator('button.set-weight').click();
    assert.match(await banner('said').innerText(), /weight 250/);
    await until('the registration carries it', `${base}/services`, async () =>
      (await row(USER, env.USER_B).locator('td.weight').innerText()) === '250');
    assert.match(lineOf(meshctl('instances', USER), env.USER_B), / 250 /);
  });

  await step('a weight out of range is refused', async () => {
    await row(USER, env.USER_B).locator('input[name=weight]').evaluate((e) => e.removeAttribute('max'));
    await row(USER, env.USER_B).locator('input[name=weight]').fill('20000');
    await row(USER, env.USER_B).locator('button.set-weight').click();
    assert.match(await banner('error').innerText(), /not a number within 1\.\.=10000/);
    assert.match(lineOf(meshctl('instances', USER), env.USER_B), / 250 /, 'unchanged');
  });

  let first;
  await step('a bad setting is refused with its reason', async () => {
    await page.goto(`${base}/config/user`);
    await page.fill('#set-path', 'registry.ttl_secs');
    await page.fill('#set-value', '1');
    await page.click('#set-save');
    const said = await banner('error').innerText();
    assert.match(said, /refused, nothing written/);
    assert.match(said, /registry\.ttl_secs/);
    assert.equal(await page.inputValue('#set-value'), '1', 'the form keeps what was typed');
    await shot('config-refused');
    assert.doesNotMatch(meshctl('config', 'get', 'user'), /registry\.ttl_secs/);
  });

  await step('set a setting twice', async () => {
    for (const value of ['"debug"', '"warn"']) {
      await page.goto(`${base}/config/user`);
      await page.fill('#set-path', 'log.filter');
      await page.fill('#set-value', value);
      await page.click('#set-save');
      assert.match(await banner('said').innerText(), /user\/log\.filter set at revision \d+/);
    }
    assert.match(meshctl('config', 'get', 'user'), /log\.filter\s+\d+\s+"warn"/);
    await shot('config');
  });

  await step('roll a setting back', async () => {
    await page.goto(`${base}/config/user/history?path=log.filter`);
    const rows = page.locator('table.history tr[data-revision]');
    assert.equal(await rows.count(), 2);
    first = await rows.nth(1).getAttribute('data-revision');
    await rows.nth(1).locator('button.rollback').click();
    assert.match(await banner('said').innerText(), new RegExp(`rolled back to revision ${first}`));
    const newest = await page.locator('table.history tr[data-revision]').first().innerText();
    assert.match(newest, /"debug"/);
    assert.match(newest, new RegExp(`rollback to ${first}`));
    assert.match(newest, /admin \(console\)/);
    await shot('history');
    assert.match(meshctl('config', 'get', 'user'), /log\.filter\s+\d+\s+"debug"/);
  });

  await step('compare two revisions', async () => {
    await page.goto(`${base}/config/user`);
    const now = await page.locator('#revision').innerText();
    await page.fill('#diff-from', String(Number(first) - 1));
    await page.fill('#diff-to', now);
    await page.click('#diff-go');
    assert.match(await page.locator('table.diff').innerText(), /log\.filter[\s\S]*\(not set\)[\s\S]*"debug"/);
    await shot('diff');
  });

  await step('every change is in the audit log', async () => {
    await page.goto(`${base}/audit`);
    const text = await page.locator('table.audit').innerText();
    for (const action of ['drain', 'undrain', 'weight', 'config set', 'config rollback', 'sign-in']) {
      assert.match(text, new RegExp(`admin \\(console\\)\\s+${action}`), action);
    }
    await shot('audit');
  });

  let cookies;
  await step('sign out, and the old session is refused', async () => {
    cookies = await context.cookies();
    await page.goto(`${base}/services`);
    await page.click('#sign-out');
    assert.match(page.url(), /\/login/);
    assert.match(await banner('said').innerText(), /Signed out/);
    await page.goto(`${base}/services`);
    assert.match(page.url(), /\/login/);
    const stale = await browser.newContext();
    await stale.addCookies(cookies);
    const again = await stale.newPage();
    await again.goto(`${base}/config/user`);
    assert.match(again.url(), /\/login/);
    assert.match(await again.locator('.banner.said').innerText(), /session ended/);
    await stale.close();
  });

  await step('the read-only role sees but cannot change', async () => {
    await page.fill('#user', 'viewer');
    await page.fill('#password', env.VIEWER_PASSWORD);
    await page.click('#sign-in');
    assert.match(await page.locator('#who').innerText(), /viewer · read-only/);
    assert.equal(await page.locator(`table[data-service="${USER}"] tr[data-instance]`).count(), 2);
    assert.equal(await page.locator('button.drain, button.set-weight').count(), 0);
    await page.goto(`${base}/config/user`);
    assert.equal(await page.locator('#set-form').count(), 0);
    await shot('viewer');
    await page.click('#sign-out');
  });

  if (env.ADMIN_TOKEN) {
    await step('sign in with a token from the gateway\'s issuer', async () => {
      await page.fill('#token', env.ADMIN_TOKEN);
      await page.click('#sign-in-token');
      assert.match(page.url(), /\/services$/);
      assert.match(await page.locator('#who').innerText(), /· admin/);
    });
  }
} finally {
  await browser.close();
}
process.exit(failed() ? 1 : 0);
