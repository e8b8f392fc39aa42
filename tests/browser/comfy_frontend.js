#!/usr/bin/env node
// Drives ComfyUI's real frontend in headless Debian chromium through npm playwright-core (never a
// downloaded browser). Used by tests/test_comfyui_browser.py and tools/make_workflows.py.
//
//   node comfy_frontend.js <command> <job.json> <result.json>
//   env: COMFY_URL (http://127.0.0.1:PORT), CHROMIUM (browser binary), PLAYWRIGHT_CORE (module dir)
//
// Commands (job -> result):
//   api2ui     {workflows: {name: apiPrompt}}         -> {name: {workflow, output}}
//              app.loadApiJson + app.graphToPrompt: API prompt -> UI-format workflow.
//   normalize  {workflows: {name: uiWorkflow}, thumbnails: dir|null}
//                                                    -> {name: {workflow, output}} (+ dir/name.jpg)
//              app.loadGraphData + app.graphToPrompt, i.e. what "Save" in the UI would write.
//   queue      {workflows: {name: uiWorkflow}, timeout_ms}
//                                                    -> {name: {output, prompt_id, status, error_dialog}}
//              loads each workflow, queues it from the UI (app.queuePrompt) and waits for its history;
//              res.layout: {loaded, ran} node rectangles and visible area (layout()) before and after
//              the run (previews grow nodes); job.screenshots: a folder for a <name>.png of each.
//   templates  {pack, expect: {name: [node types]}}   -> {listed, cards, titles, thumbs, fetched, loaded}
//              opens Templates -> Extensions -> <pack>, clicks every card, records the loaded graph.
//   check      queue + templates + loader widgets + missing models ({missing_models: {name: uiWorkflow}})
//              in one browser session -> {queue: ..., templates: ..., loader_widgets: ..., missing_models: ...}
'use strict';
const fs = require('fs');
const path = require('path');

const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');
const BASE = process.env.COMFY_URL || 'http://127.0.0.1:8188';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function open(viewport) {
  // A fresh user dir opens the template browser on first load; mark the tutorial as done first.
  await fetch(`${BASE}/settings/Comfy.TutorialCompleted`, { method: 'POST', body: 'true' });
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  const page = await browser.newPage({ viewport: viewport || { width: 1400, height: 900 } });
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e && e.message || e)));
  await page.goto(`${BASE}/`);
  await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null,
    { timeout: 90000 });
  await page.waitForFunction(() => window.LiteGraph && window.LiteGraph.registered_node_types['PSVAELoader'],
    null, { timeout: 30000 });
  return { browser, page, pageErrors };
}

async function closeDialogs(page) {
  for (let i = 0; i < 3; i++) {
    if (await page.locator('.p-dialog-mask').count() === 0) break;
    await page.keyboard.press('Escape');
    await sleep(300);
  }
}

async function api2ui(page, job) {
  const out = {};
  for (const [name, api] of Object.entries(job.workflows)) {
    out[name] = await page.evaluate(async ([api, name]) => {
      await window.app.loadApiJson(api, name);
      const { workflow, output } = await window.app.graphToPrompt();
      return { workflow, output };
    }, [api, name]);
  }
  return out;
}

async function normalize(page, job) {
  const out = {};
  for (const [name, wf] of Object.entries(job.workflows)) {
    out[name] = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(JSON.parse(JSON.stringify(wf)), true, true, null);
      const { workflow, output } = await window.app.graphToPrompt();
      return { workflow, output };
    }, wf);
    if (job.thumbnails) {
      await closeDialogs(page);
      await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'));
      await sleep(500);
      // The canvas pixels only (no menus or banners over it).
      const dataUrl = await page.evaluate(() => {
        window.app.canvas.show_info = false;
        window.app.canvas.draw(true, true);
        return window.app.canvas.canvas.toDataURL('image/jpeg', 0.85);
      });
      fs.writeFileSync(path.join(job.thumbnails, `${name}.jpg`), Buffer.from(dataUrl.split(',')[1], 'base64'));
    }
  }
  return out;
}

// Where the frontend drew each node (graph units, title bar included: [x, y, w, h]) and the part of
// the graph the canvas shows ([x, y, w, h]), after a redraw at this window size and the graph's zoom.
async function layout(page) {
  return page.evaluate(() => {
    const c = window.app.canvas;
    c.draw(true, true);
    const box = c.canvas.getBoundingClientRect();
    return {
      visible: Array.from(c.visible_area), scale: c.ds.scale, canvas: [box.x, box.y, box.width, box.height],
      nodes: window.app.graph._nodes.map((n) => {
        const el = n.widgets && n.widgets[0] && n.widgets[0].element;  // a Note's textarea
        return { id: n.id, type: n.type, rect: Array.from(n.boundingRect),
          text_overflows: el ? el.scrollHeight > el.clientHeight + 1 : null };
      }),
    };
  });
}

async function waitHistory(promptId, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const r = await fetch(`${BASE}/history/${promptId}`);
    const h = (await r.json())[promptId];
    if (h && h.status && ['success', 'error'].includes(h.status.status_str)) return h;
    await sleep(250);
  }
  return null;
}

async function queue(page, job) {
  const out = {};
  for (const [name, wf] of Object.entries(job.workflows)) {
    const started = Date.now();
    await page.evaluate(async (wf) => {
      await window.app.loadGraphData(JSON.parse(JSON.stringify(wf)), true, true, null);
    }, wf);
    const { output } = await page.evaluate(() => window.app.graphToPrompt());
    const loadedLayout = await layout(page);
    const response = page.waitForResponse((r) => r.url().endsWith('/prompt') && r.request().method() === 'POST',
      { timeout: 30000 });
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    const resp = await response;
    const body = await resp.json().catch(() => ({}));
    const res = { output, http_status: resp.status(), prompt_id: body.prompt_id || null,
      node_errors: body.node_errors || null, status: null, error_dialog: null };
    if (res.prompt_id) {
      const h = await waitHistory(res.prompt_id, job.timeout_ms || 120000);
      res.status = h ? h.status : 'timeout';
      res.outputs = h ? h.outputs : null;
    }
    await sleep(300);
    res.layout = { loaded: loadedLayout, ran: await layout(page) };
    if (job.screenshots) await page.screenshot({ path: path.join(job.screenshots, `${name}.png`) });
    const dialog = page.locator('.p-dialog:visible');
    if (await dialog.count()) res.error_dialog = (await dialog.first().innerText()).slice(0, 2000);
    await closeDialogs(page);
    res.seconds = (Date.now() - started) / 1000;
    out[name] = res;
  }
  return out;
}

async function templates(page, job) {
  const listed = await (await fetch(`${BASE}/workflow_templates`)).json();
  const fetched = [];
  page.on('response', (r) => {
    if (r.url().includes('/workflow_templates/')) fetched.push({ url: r.url(), status: r.status() });
  });
  await closeDialogs(page);
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
  const dialog = page.locator('.p-dialog:visible').first();
  await dialog.getByText(job.pack, { exact: true }).first().click();
  await sleep(1000);
  const readCards = () => page.evaluate(() => Array.from(
    document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"]')).map((e) => e.getAttribute('data-testid')));
  const cards = await readCards();
  const titles = await page.evaluate(() => Array.from(
    document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"] h3')).map((e) => ({ text: e.textContent.trim(), cut: e.scrollWidth > e.clientWidth })));
  await sleep(1000);
  // Thumbnails are fetched, then shown from blob: URLs: record both sides. They load lazily, so each
  // card is scrolled into view first and given a few seconds to show its image.
  const thumbs = await page.evaluate(async () => {
    const out = [];
    for (const card of document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"]')) {
      card.scrollIntoView({ block: 'center' });
      const shown = () => { const img = card.querySelector('img'); return !!img && img.complete && img.naturalWidth > 0; };
      for (let i = 0; i < 50 && !shown(); i++) await new Promise((r) => setTimeout(r, 100));
      const img = card.querySelector('img');
      out.push({ card: card.getAttribute('data-testid'), width: img ? img.naturalWidth : 0,
        height: img ? img.naturalHeight : 0, ok: shown() });
    }
    return out;
  });
  if (job.screenshot) await page.screenshot({ path: job.screenshot });
  const loaded = {};
  for (const name of Object.keys(job.expect || {})) {
    if (!(await page.locator('.p-dialog:visible').count())) {
      await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
      await page.locator('.p-dialog:visible').first().getByText(job.pack, { exact: true }).first().click();
      await sleep(800);
    }
    await page.locator(`.p-dialog [data-testid="template-workflow-${name}"]`).first().click();
    await page.waitForFunction((n) => !document.querySelector(`.p-dialog [data-testid="template-workflow-${n}"]`),
      name, { timeout: 15000 }).catch(() => {});
    await sleep(800);
    loaded[name] = await page.evaluate(() => window.app.graph._nodes.map((n) => n.type).sort());
  }
  return { listed, cards, titles, thumbs, fetched, loaded };
}

// Loads each workflow and returns the text of the dialog the frontend opens (its Missing Models
// dialog lists the `models` entries whose file is not in the model folder), or null.
async function missingModels(page, job) {
  const out = {};
  for (const [name, wf] of Object.entries(job.missing_models || {})) {
    await closeDialogs(page);
    await page.evaluate(async (wf) => {
      await window.app.loadGraphData(JSON.parse(JSON.stringify(wf)), true, true, null);
    }, wf);
    await sleep(1000);
    const dialog = page.locator('.p-dialog:visible');
    out[name] = (await dialog.count()) ? (await dialog.first().innerText()).slice(0, 2000) : null;
  }
  await closeDialogs(page);
  return out;
}

// A new PS-VAE Loader at its default size, each file widget set to a given file and drawn by the
// frontend itself: the label and the texts it painted (a cut text ends in an ellipsis).
async function loaderWidgets(page, job) {
  return page.evaluate((files) => {
    const node = window.LiteGraph.createNode('PSVAELoader');
    window.app.graph.add(node);
    const ctx = window.app.canvas.canvas.getContext('2d');
    const out = { node_width: node.size[0], widgets: {} };
    for (const w of node.widgets.filter((w) => w.name in files)) {
      w.value = files[w.name];
      const drawn = [];
      const fillText = ctx.fillText;
      ctx.fillText = function (text, ...rest) { drawn.push(String(text)); return fillText.call(this, text, ...rest); };
      ctx.save();
      ctx.font = `${window.LiteGraph.NODE_SUBTEXT_SIZE}px Arial`;
      try { w.drawWidget(ctx, { width: node.size[0], showText: true }); } finally { ctx.restore(); ctx.fillText = fillText; }
      out.widgets[w.name] = { label: w.label ?? w.name, value: files[w.name], drawn };
    }
    window.app.graph.remove(node);
    return out;
  }, job.loader_files || {});
}

(async () => {
  const [command, jobPath, resultPath] = process.argv.slice(2);
  const job = JSON.parse(fs.readFileSync(jobPath, 'utf8'));
  const check = async (page, job) => {
    const t0 = Date.now();
    const q = await queue(page, job);
    const t1 = Date.now();
    const t = await templates(page, job);
    const w = await loaderWidgets(page, job);
    const m = await missingModels(page, job);
    return { queue: q, templates: t, loader_widgets: w, missing_models: m, __seconds: { queue: (t1 - t0) / 1000, templates: (Date.now() - t1) / 1000 } };
  };
  const handlers = { api2ui, normalize, queue, templates, check };
  if (!handlers[command]) throw new Error(`unknown command ${command}`);
  const started = Date.now();
  const { browser, page, pageErrors } = await open(job.viewport);
  const opened = (Date.now() - started) / 1000;
  try {
    const result = await handlers[command](page, job);
    result.__page_errors = pageErrors;
    result.__open_seconds = opened;
    result.__frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__);
    fs.writeFileSync(resultPath, JSON.stringify(result, null, 1));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e && e.stack || e); process.exit(1); });
