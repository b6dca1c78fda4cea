// The console's operations pages in headless Chromium: watch a method's
// chart move under load and follow an exemplar to its trace, set a rule and
// see calls refused, replay a dead letter and see it applied once, trigger
// a job with a parameter and read its run, pause and resume it; the
// read-only role sees all of it and can change none. Started by
// services/integration-tests/tests/console_operations.rs, which runs the
// mesh, the load and the console and passes them in the environment:
//   CONSOLE_URL, ADMIN_PASSWORD, VIEWER_PASSWORD, COMPONENT, METHOD,
//   DEAD_EVENT, JOB, TRACE_URL, SHOTS_DIR, CHROMIUM
// Prints one line per step and `exemplar ID` / `run-trace ID` for the test
// to check against the traces it received; exits non-zero at the first
// step that fails.
import assert from 'node:assert/strict';
import { launch, stepper } from './harness.mjs';

const env = process.env;
for (const name of ['CONSOLE_URL', 'ADMIN_PASSWORD', 'VIEWER_PASSWORD', 'COMPONENT', 'METHOD', 'DEAD_EVENT', 'JOB', 'TRACE_URL', 'SHOTS_DIR']) {
  assert.ok(env[name], `${name} is not set`);
}
const base = env.CONSOLE_URL;

const { browser, context, page, shot } = await launch(env);
const banner = (kind) => page.locator(`.banner.${kind}`);
const { step, failed } = stepper(shot);

/** Reloads `url` until `check()` gives a value (20 s); returns it. */
async function until(what, url, check) {
  const deadline = Date.now() + 20_000;
  for (;;) {
    await page.goto(url);
    const got = await check();
    if (got) return got;
    if (Date.now() > deadline) throw new Error(`not within 20 s: ${what}`);
    await page.waitForTimeout(300);
  }
}

const num = async (locator) => Number((await locator.innerText()).trim());
const sum = async (selector) => {
  let total = 0;
  for (const cell of await page.locator(selector).all()) total += await num(cell);
  return total;
};

async function signIn(p, user, password) {
  await p.goto(`${base}/login`);
  await p.fill('#user', user);
  await p.fill('#password', password);
  await p.click('#sign-in');
}

const governance = `${base}/governance/${encodeURIComponent(env.COMPONENT)}`;
const liveRow = () => page.locator(`table.live tr[data-method="${env.METHOD}"]`);

try {
  await step('sign in as admin', async () => {
    await signIn(page, 'admin', env.ADMIN_PASSWORD);
    assert.match(await page.locator('#who').innerText(), /admin · admin/);
  });

  await step('the component is listed with its instances', async () => {
    await page.click('nav >> text=Governance');
    await page.click(`a[href="/governance/${env.COMPONENT}"]`);
    assert.equal(page.url(), governance);
  });

  await step('the chart moves under load', async () => {
    await page.waitForSelector(`table.live tr[data-method="${env.METHOD}"]`, { timeout: 15_000 });
    const points = async () => Number(await page.locator('#charts-note').getAttribute('data-points'));
    const first = await points();
    await page.waitForFunction((n) => Number(document.getElementById('charts-note')?.dataset.points) >= n + 3, first, { timeout: 15_000 });
    const calls = await num(liveRow().locator('.calls-now'));
    assert.ok(calls > 5, `calls/s under load: ${calls}`);
    assert.ok(await points() >= first + 3);
    assert.equal(await liveRow().locator('svg.chart').count(), 2);
  });

  await step('a p99 point links to the trace of a call', async () => {
    const dot = liveRow().locator('a.exemplar').first();
    await dot.waitFor({ timeout: 15_000 });
    const trace = await dot.getAttribute('data-trace');
    assert.match(trace, /^[0-9a-f]{32}$/);
    assert.equal(await dot.getAttribute('href'), env.TRACE_URL.replace('{trace_id}', trace));
    console.log(`exemplar ${trace}`);
    await shot('governance-live');
  });

  await step('a rule with a bad number is refused, naming the field', async () => {
    await page.fill('#rule-pattern', env.METHOD);
    await page.fill('#rule-qps', 'lots');
    await page.click('#rule-save');
    assert.match(await banner('error').innerText(), /qps: "lots" is not a number/);
    assert.equal(await page.locator(`table.rules tr[data-rule="${env.METHOD}"]`).count(), 0);
  });

  await step('a rule the settings refuse is refused with their reason', async () => {
    await page.fill('#rule-pattern', env.METHOD);
    await page.fill('#rule-qps', '');
    await page.check('#rule-breaker');
    await page.fill('#rule-error_ratio', '0');
    await page.fill('#rule-slow_ratio', '0');
    await page.click('#rule-save');
    assert.match(await banner('error').innerText(), /an enabled breaker needs error_ratio or slow_ratio above 0/);
    assert.equal(await page.locator(`table.rules tr[data-rule="${env.METHOD}"]`).count(), 0);
  });

  await step('set a rate limit and see calls refused', async () => {
    await page.goto(governance);
    await page.fill('#rule-pattern', env.METHOD);
    await page.fill('#rule-qps', '5');
    await page.fill('#rule-burst', '1');
    await page.click('#rule-save');
    assert.match(await banner('said').innerText(), /The rule for .* is set/);
    const rule = page.locator(`table.rules tr[data-rule="${env.METHOD}"]`);
    assert.equal(await rule.locator('td').nth(2).innerText(), '5');
    const refused = await until('calls refused by the rule', governance, async () => {
      const cells = page.locator(`table.refusals tr[data-target="${env.METHOD}"] .refused`);
      return (await cells.count()) > 0 && (await num(cells.first())) > 0 ? num(cells.first()) : null;
    });
    assert.ok(refused > 0);
    await page.waitForFunction((m) => {
      const row = document.querySelector(`table.live tr[data-method="${m}"] .errors-now`);
      return row && Number(row.textContent) > 0;
    }, env.METHOD, { timeout: 15_000 });
    await shot('governance-rule');
  });

  await step('remove the rule', async () => {
    await page.goto(governance);
    await page.locator(`table.rules tr[data-rule="${env.METHOD}"] button.remove-rule`).click();
    assert.match(await banner('said').innerText(), /is removed/);
    assert.equal(await page.locator(`table.rules tr[data-rule="${env.METHOD}"]`).count(), 0);
  });

  await step('the event pipeline and the dead letter with its error', async () => {
    await page.click('nav >> text=Events');
    assert.equal(await page.locator('table.relays td:text-is("leads")').count(), 1);
    assert.ok(await page.locator('table.partitions tr[data-topic]').count() >= 1);
    const dead = page.locator(`table.dead-letters tr[data-event="${env.DEAD_EVENT}"]`);
    assert.equal(await dead.count(), 1);
    assert.match(await dead.locator('.error-text').innerText(), /refused by the test/);
    assert.equal(await dead.locator('a.trace').count(), 1, 'the dead letter links to the trace of the order');
    await shot('events');
  });

  await step('replay the dead letter: applied once', async () => {
    const applied = await sum('table.partitions .applied');
    await page.locator(`table.dead-letters tr[data-event="${env.DEAD_EVENT}"] button.replay`).click();
    assert.match(await banner('said').innerText(), new RegExp(`Event ${env.DEAD_EVENT} replayed onto`));
    await until('the replay applied', `${base}/events`, async () => (await sum('table.partitions .applied')) === applied + 1);
  });

  await step('replay it again: skipped as a duplicate', async () => {
    const applied = await sum('table.partitions .applied');
    const duplicates = await sum('table.partitions .duplicates');
    await page.locator(`table.dead-letters tr[data-event="${env.DEAD_EVENT}"] button.replay`).click();
    await until('the second replay skipped', `${base}/events`, async () => (await sum('table.partitions .duplicates')) === duplicates + 1);
    assert.equal(await sum('table.partitions .applied'), applied);
  });

  const job = page.locator(`table.jobs tr[data-job="${env.JOB}"]`);
  await step('trigger a job with a parameter and read its run', async () => {
    await page.click('nav >> text=Jobs');
    assert.equal(await job.locator('.job-state').innerText(), 'active');
    await job.locator('input[name=param]').fill('30');
    await job.locator('button.trigger').click();
    assert.match(await banner('said').innerText(), /triggered: 1 run started/);
    const run = await until('the run succeeded', `${base}/jobs?job=${env.JOB}`, async () => {
      const r = page.locator('table.runs tr[data-run]').first();
      return (await r.count()) && (await r.locator('.run-status').innerText()) === 'succeeded' ? r : null;
    });
    assert.match(await run.locator('.run-message').innerText(), /slept 30 ms on /);
    assert.notEqual(await run.locator('td').nth(6).innerText(), '-', 'the executor is named');
    const link = run.locator('a.trace');
    const href = await link.getAttribute('href');
    const trace = href.split('/').pop();
    assert.equal(href, env.TRACE_URL.replace('{trace_id}', trace));
    console.log(`run-trace ${trace}`);
    await shot('jobs');
  });

  await step('a run that fails shows its error', async () => {
    await page.goto(`${base}/jobs`);
    await job.locator('input[name=param]').fill('soon');
    await job.locator('button.trigger').click();
    const run = await until('the run failed', `${base}/jobs?job=${env.JOB}`, async () => {
      const r = page.locator('table.runs tr[data-run]').first();
      return (await r.locator('.run-status').innerText()) === 'failed' ? r : null;
    });
    assert.match(await run.locator('.run-message').innerText(), /param "soon" is not milliseconds/);
  });

  await step('pause and resume the job', async () => {
    await page.goto(`${base}/jobs`);
    await job.locator('button.pause').click();
    assert.match(await banner('said').innerText(), /is paused/);
    assert.equal(await job.locator('.job-state').innerText(), 'paused');
    await job.locator('button.resume').click();
    assert.match(await banner('said').innerText(), /is active again/);
    assert.equal(await job.locator('.job-state').innerText(), 'active');
  });

  await step('every change is in the audit log', async () => {
    await page.click('nav >> text=Audit log');
    const text = await page.locator('main').innerText();
    for (const action of ['config set', 'replay', 'job trigger', 'job pause', 'job resume']) {
      assert.ok(text.includes(action), `${action} is in the audit log`);
    }
  });

  await step('the read-only role sees the pages but no change', async () => {
    const viewer = await browser.newContext();
    const p = await viewer.newPage();
    await signIn(p, 'viewer', env.VIEWER_PASSWORD);
    await p.goto(governance);
    assert.equal(await p.locator('#rule-form').count(), 0);
    await p.waitForSelector(`table.live tr[data-method="${env.METHOD}"]`, { timeout: 15_000 });
    await p.goto(`${base}/events`);
    assert.equal(await p.locator(`table.dead-letters tr[data-event="${env.DEAD_EVENT}"]`).count(), 1);
    assert.equal(await p.locator('button.replay').count(), 0);
    await p.goto(`${base}/jobs`);
    assert.equal(await p.locator(`table.jobs tr[data-job="${env.JOB}"]`).count(), 1);
    assert.equal(await p.locator('button.trigger, button.pause, button.resume').count(), 0);
    await viewer.close();
  });
} finally {
  await browser.close();
}
process.exit(failed() ? 1 : 0);
