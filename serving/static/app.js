// The /ui page: classify an image against a label set and probe how robust the answer is.
// Plain JavaScript, no dependencies; every call goes to this server's own API (same origin).
"use strict";

const KEY_STORE = "capt-api-key";            // sessionStorage only: gone when the tab closes
const API = location.pathname.replace(/\/ui(\/.*)?$/, "");  // the service's root ("" unless prefixed)
const EPS_CHOICES_255 = [1, 2, 3, 4, 6, 8, 12, 16];
const DEFAULT_EPS_255 = 4;

const $ = (id) => document.getElementById(id);
const state = {info: null, file: null, cleanPixels: null, cleanSize: null};

// ---- errors and the API --------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function errorText(err, what) {
  if (err instanceof ApiError && err.status === 401) {
    const key = $("api-key").value.trim();
    return (key ? "401 Unauthorized: the server refused this API key. Check the key in the “API key” field."
                : "401 Unauthorized: this server needs an API key. Enter it in the “API key” field at the top "
                  + "(it is sent as a Bearer token and kept in this tab only).") + (err.message ? ` (${err.message})` : "");
  }
  if (err instanceof ApiError) return `${what} failed: HTTP ${err.status}: ${err.message}`;
  return `${what} failed: ${err && err.message ? err.message : err}`;
}

async function api(path, body) {
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  if (!(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body || {});
  }
  let response;
  try {
    response = await fetch(API + path, {method: "POST", headers, body, credentials: "same-origin", cache: "no-store"});
  } catch (err) {
    throw new Error(`no answer from the server (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: reported below */ }
  if (!response.ok) {
    let message = text.slice(0, 500);
    if (data && typeof data === "object" && data.error !== undefined && data.error !== null) {
      // {"error": "..."}, or an object with a message (the OpenAI-style routes' shape).
      message = typeof data.error === "object" ? String(data.error.message || JSON.stringify(data.error)) : String(data.error);
    }
    if (data && Array.isArray(data.detail) && data.detail.length) {
      message += " — " + data.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
    throw new ApiError(response.status, message || response.statusText);
  }
  if (data === null) throw new ApiError(response.status, "the answer was not JSON");
  return data;
}

// ---- model info ------------------------------------------------------------------------------
async function loadInfo() {
  const line = $("model-info");
  try {
    const info = await api("/info", {});
    state.info = info;
    line.textContent = "";
    const name = document.createElement("b");
    name.id = "model-name";
    name.textContent = info.model;
    line.append("Model ", name,
                ` · ${info.method || "zero-shot"} · ${info.image_size}×${info.image_size} input · ${info.onnx_provider}`
                + ` · probe eps ≤ ${fmt(info.limits.max_probe_eps * 255, 1)}/255, steps ≤ ${info.limits.max_probe_steps}`);
    line.classList.remove("muted");
    fillEps(info.limits.max_probe_eps);
    $("steps").max = info.limits.max_probe_steps;
    clearErrorIf401();
    return info;
  } catch (err) {
    line.textContent = "Model info unavailable (see the message above).";
    showError(errorText(err, "Reading /info"));
    return null;
  }
}

function clearErrorIf401() {
  if ($("error").textContent.startsWith("401")) clearError();
}

function fillEps(maxEps) {
  const select = $("eps");
  const chosen = select.value || String(DEFAULT_EPS_255);
  select.textContent = "";
  for (const k of EPS_CHOICES_255) {
    if (k / 255 > maxEps + 1e-9) continue;
    const option = document.createElement("option");
    option.value = String(k);
    option.textContent = `${k}/255`;
    select.append(option);
  }
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : (select.options[0] || {}).value;
}

// ---- the image ---------------------------------------------------------------------------------
function setFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`“${file.name}” is not an image (${file.type}).`);
    return;
  }
  clearError();
  state.file = file;
  state.cleanPixels = null;
  const url = URL.createObjectURL(file);
  const img = $("preview");
  img.onload = () => {
    // The clean pixels, composited on white as the server does, for the perturbation.
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d", {willReadFrequently: true});
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(img, 0, 0);
    state.cleanPixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    state.cleanSize = [canvas.width, canvas.height];
    $("file-info").textContent = `${file.name} · ${canvas.width}×${canvas.height} · ${fmtBytes(file.size)}`;
  };
  img.onerror = () => {
    $("file-info").textContent = `${file.name} · ${fmtBytes(file.size)} (the browser cannot show it; the server may still read it)`;
  };
  img.src = url;
  img.hidden = false;
  $("drop-text").hidden = true;
}

function setupDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) setFile(file);
  });
}

// ---- labels and classify -------------------------------------------------------------------------
function parseLabels(text) {
  // One per line when there are several lines, otherwise comma separated; blanks dropped.
  const parts = text.includes("\n") ? text.split("\n") : text.split(",");
  return parts.map((s) => s.trim()).filter((s) => s.length > 0);
}

function requireInputs(minLabels) {
  if (!state.file) throw new Error("choose an image first");
  const labels = parseLabels($("labels").value);
  if (labels.length < minLabels) {
    throw new Error(minLabels > 1 ? `give at least ${minLabels} labels` : "give at least one label");
  }
  return labels;
}

async function classify() {
  clearError();
  const status = $("classify-status");
  let labels;
  try { labels = requireInputs(1); } catch (err) { showError(err.message); return; }
  const maxTopK = state.info ? state.info.limits.max_top_k : 100;
  const form = new FormData();
  form.append("images", state.file, state.file.name || "image");
  form.append("labels", JSON.stringify(labels));
  form.append("top_k", String(Math.min(labels.length, maxTopK)));
  status.textContent = "classifying…";
  $("classify").disabled = true;
  try {
    const answer = await api("/classify", form);
    renderClassify(answer);
    status.textContent = "";
  } catch (err) {
    status.textContent = "failed";
    showError(errorText(err, "Classify"));
  } finally {
    $("classify").disabled = false;
  }
}

function renderClassify(answer) {
  const ranked = answer.predictions[0];
  const list = $("results");
  list.textContent = "";
  ranked.forEach((p, i) => {
    const item = document.createElement("li");
    item.className = "bar-row" + (i === 0 ? " top" : "");
    item.dataset.label = p.label;
    item.dataset.probability = String(p.probability);
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = p.label;
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${Math.max(0.5, 100 * p.probability).toFixed(2)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = `${(100 * p.probability).toFixed(1)}%`;
    item.append(name, track, value);
    list.append(item);
  });
  const top = $("top");
  top.classList.remove("muted");
  top.textContent = "Top label: ";
  const label = document.createElement("b");
  label.id = "top-label";
  label.textContent = ranked[0].label;
  top.append(label, ` (${(100 * ranked[0].probability).toFixed(1)}%)`);
  const meta = [`label cache ${answer.label_cache_hit ? "hit" : "miss"}`];
  if (answer.templates_note) meta.push(answer.templates_note);
  $("classify-meta").textContent = meta.join(" · ");
}

// ---- probe -----------------------------------------------------------------------------------
function probeSpace() {
  // "input" attacks the model's input pixels: when the upload is already at the input size, that is the
  // upload itself, so clean and adversarial images line up pixel for pixel. Otherwise "upload" (the
  // upload's own pixels, through a differentiable copy of the resize) where the server allows it.
  if (!state.info || !state.cleanSize) return "input";
  const [w, h] = state.cleanSize;
  if (w === state.info.image_size && h === state.info.image_size) return "input";
  return w * h <= state.info.limits.max_probe_upload_pixels ? "upload" : "input";
}

async function probe() {
  clearError();
  const status = $("probe-status");
  let labels;
  try { labels = requireInputs(2); } catch (err) { showError(err.message); return; }
  const eps255 = Number($("eps").value || DEFAULT_EPS_255);
  const space = probeSpace();
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image");
  form.append("labels", JSON.stringify(labels));
  form.append("eps", String(eps255 / 255));
  form.append("steps", String(Math.max(1, Number($("steps").value) || 10)));
  form.append("seed", String(Math.max(0, Number($("seed").value) || 0)));
  form.append("attack", $("attack").value);
  form.append("space", space);
  form.append("return_images", "true");
  form.append("search_eps", "true");
  status.textContent = "probing (attack, then eps search)…";
  $("probe").disabled = true;
  try {
    const result = await api("/probe", form);
    await renderProbe(result);
    status.textContent = `done in ${fmt(result.time_ms / 1000, 2)} s`;
  } catch (err) {
    status.textContent = "failed";
    showError(errorText(err, "Probe"));
  } finally {
    $("probe").disabled = false;
  }
}

function fact(list, term, value, id) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  if (id) dd.id = id;
  list.append(dt, dd);
}

async function renderProbe(r) {
  $("probe-result").hidden = false;
  const verdict = $("verdict");
  verdict.dataset.flipped = String(r.flipped);
  verdict.className = "verdict " + (r.flipped ? "flipped" : "held");
  verdict.textContent = r.flipped
    ? `Flipped at eps ${fmt(r.eps_255, 3)}/255: “${r.clean.label}” became “${r.adversarial.label}”.`
    : `Held at eps ${fmt(r.eps_255, 3)}/255: still “${r.adversarial.label}” (this attack failed; not a proof of robustness).`;

  const facts = $("probe-facts");
  facts.textContent = "";
  fact(facts, "flipped", String(r.flipped), "probe-flipped");
  fact(facts, "eps", `${fmt(r.eps_255, 3)}/255`, "probe-eps");
  fact(facts, "clean", `${r.clean.label} (${pct(r.clean.probability)}), margin ${fmt(r.margin_clean, 3)}`);
  fact(facts, "adversarial", `${r.adversarial.label} (${pct(r.adversarial.probability)}), margin ${fmt(r.margin_adversarial, 3)}`);
  fact(facts, "served ONNX", `${r.served_onnx.clean.label} → ${r.served_onnx.adversarial.label}`
       + ` (flipped: ${r.served_onnx.flipped})`);
  fact(facts, "L∞ distance", `${fmt(r.linf_distance_255, 3)}/255`);
  fact(facts, "attack", `${r.attack.name}, ${r.attack.steps} steps, ${r.attack.restarts} restart(s), seed ${r.attack.seed}`);
  fact(facts, "space", r.eps_space || r.space);
  const warnings = Object.entries(r.sanity || {}).filter(([, v]) => v).map(([k]) => k.replace(/_/g, " "));
  if (warnings.length) fact(facts, "sanity", warnings.join(", "), "probe-sanity");

  await renderImages(r);
  renderCurve(r);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the server's PNG could not be decoded"));
    img.src = src;
  });
}

function pixelsOf(img) {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

function paint(canvasId, imageData) {
  const canvas = $(canvasId);
  canvas.width = imageData.width;
  canvas.height = imageData.height;
  canvas.getContext("2d").putImageData(imageData, 0, 0);
  // Small images are shown enlarged, pixel for pixel (CSS: image-rendering pixelated).
  const scale = Math.max(1, Math.floor(192 / Math.max(imageData.width, imageData.height)));
  canvas.style.width = `${Math.min(imageData.width * scale, 320)}px`;
}

async function renderImages(r) {
  const adv = pixelsOf(await loadImage(`data:image/png;base64,${r.adversarial_png}`));
  paint("adv-canvas", adv);
  $("adv-caption").textContent = `adversarial, 8-bit (${adv.width}×${adv.height}): ${r.adversarial.label}`;
  const clean = state.cleanPixels;
  const pert = $("pert-canvas");
  if (clean && clean.width === adv.width && clean.height === adv.height) {
    paint("clean-canvas", clean);
    $("clean-caption").textContent = `clean (${clean.width}×${clean.height}): ${r.clean.label}`;
    // (adv − clean)·k + 128 per channel, in 8-bit units, k chosen so that ±eps spans the full range.
    const k = Math.max(1, Math.floor(127 / Math.max(r.eps_255, 1)));
    const out = new ImageData(adv.width, adv.height);
    let linf = 0;
    for (let i = 0; i < adv.data.length; i += 4) {
      for (let c = 0; c < 3; c++) {
        const d = adv.data[i + c] - clean.data[i + c];
        linf = Math.max(linf, Math.abs(d));
        out.data[i + c] = Math.min(255, Math.max(0, 128 + k * d));
      }
      out.data[i + 3] = 255;
    }
    paint("pert-canvas", out);
    pert.dataset.k = String(k);
    pert.dataset.linf255 = String(linf);
    pert.dataset.source = "page";
    $("pert-caption").textContent = `perturbation (adv − clean)·${k} + 128, computed here; max |δ| = ${linf}/255`;
  } else {
    // The clean image the attack started from is the model input after the resize, which the probe
    // does not return: show the server's own amplified perturbation instead.
    const shown = $("preview");
    const canvas = $("clean-canvas");
    canvas.width = shown.naturalWidth || 1;
    canvas.height = shown.naturalHeight || 1;
    canvas.getContext("2d").drawImage(shown, 0, 0);
    canvas.style.width = `${Math.min(320, Math.max(192, canvas.width))}px`;
    $("clean-caption").textContent = `clean upload (${canvas.width}×${canvas.height}): ${r.clean.label}`;
    const server = pixelsOf(await loadImage(`data:image/png;base64,${r.perturbation_png}`));
    paint("pert-canvas", server);
    pert.dataset.source = "server";
    delete pert.dataset.k;
    $("pert-caption").textContent = "perturbation from the server, 0.5 + 0.5·δ/eps (the attacked clean image "
      + "differs in size from the upload, so it is not computed here)";
  }
}

// ---- the eps-search curve (inline SVG) -------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";

function svg(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (parent) parent.append(el);
  return el;
}

function renderCurve(r) {
  const box = $("curve");
  box.textContent = "";
  const search = r.eps_search;
  if (!search) { box.textContent = "no eps search in the answer"; return; }
  // eps 0 is the clean image itself: its margin is the probe's clean margin.
  const points = [{eps_255: 0, margin: r.margin_clean, flipped: r.margin_clean < 0, clean: true},
                  ...search.grid, ...search.bisection].sort((a, b) => a.eps_255 - b.eps_255);
  const W = 720, H = 300, L = 56, R = 24, T = 24, B = 48;
  const xMax = Math.max(...points.map((p) => p.eps_255), r.eps_255, 1);
  const margins = points.map((p) => p.margin);
  let yMin = Math.min(0, ...margins), yMax = Math.max(0, ...margins);
  const pad = 0.08 * ((yMax - yMin) || 1);
  yMin -= pad; yMax += pad;
  const x = (v) => L + (W - L - R) * v / xMax;
  const y = (v) => T + (H - T - B) * (yMax - v) / (yMax - yMin);
  const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                            "aria-label": "margin of the target label against eps", id: "curve-svg"}, box);
  // Axes, ticks and grid.
  svg("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}, chart);
  svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}, chart);
  for (const v of niceTicks(0, xMax, 8)) {
    svg("line", {x1: x(v), y1: H - B, x2: x(v), y2: H - B + 4, class: "axis"}, chart);
    svg("text", {x: x(v), y: H - B + 16, class: "tick", "text-anchor": "middle"}, chart).textContent = fmt(v, 2);
  }
  for (const v of niceTicks(yMin, yMax, 6)) {
    svg("line", {x1: L, y1: y(v), x2: W - R, y2: y(v), class: "grid"}, chart);
    svg("text", {x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end"}, chart).textContent = fmt(v, 2);
  }
  svg("text", {x: (L + W - R) / 2, y: H - 8, class: "axis-label", "text-anchor": "middle"}, chart).textContent = "eps (/255)";
  svg("text", {x: 14, y: (T + H - B) / 2, class: "axis-label", "text-anchor": "middle",
               transform: `rotate(-90 14 ${(T + H - B) / 2})`}, chart).textContent = "margin";
  // Margin 0: below it the prediction has flipped.
  svg("line", {x1: L, y1: y(0), x2: W - R, y2: y(0), class: "zero"}, chart);
  // The probe's own eps.
  svg("line", {x1: x(r.eps_255), y1: T, x2: x(r.eps_255), y2: H - B, class: "eps-mark"}, chart);
  const nearRight = x(r.eps_255) > W - R - 110;
  svg("text", {x: x(r.eps_255) + (nearRight ? -4 : 4), y: T - 6, class: "tick eps-label",
               "text-anchor": nearRight ? "end" : "start"}, chart).textContent = `probe eps ${fmt(r.eps_255, 2)}/255`;
  svg("polyline", {points: points.map((p) => `${x(p.eps_255)},${y(p.margin)}`).join(" "), class: "curve-line"}, chart);
  for (const p of points) {
    const dot = svg("circle", {cx: x(p.eps_255), cy: y(p.margin), r: 5,
                               class: "point " + (p.flipped ? "flip" : "hold"),
                               "data-eps-255": p.eps_255, "data-margin": p.margin}, chart);
    svg("title", {}, dot).textContent = `eps ${p.eps_255}/255: margin ${fmt(p.margin, 3)}`
      + (p.clean ? " (clean image)" : p.flipped ? " (flipped)" : " (held)");
  }
  const legend = svg("g", {class: "legend", transform: `translate(${L}, ${H - 18})`}, chart);
  svg("circle", {cx: 6, cy: 6, r: 5, class: "point hold"}, legend);
  svg("text", {x: 16, y: 10, class: "tick"}, legend).textContent = "held";
  svg("circle", {cx: 66, cy: 6, r: 5, class: "point flip"}, legend);
  svg("text", {x: 76, y: 10, class: "tick"}, legend).textContent = "flipped";

  const smallest = search.smallest_flipping_eps_255, holding = search.largest_holding_eps_255;
  const text = $("search-facts");
  text.textContent = "";
  const a = document.createElement("span");
  a.id = "smallest-flipping-eps";
  a.textContent = smallest === null ? "none within the grid" : `${fmt(smallest, 3)}/255`;
  const b = document.createElement("span");
  b.id = "largest-holding-eps";
  b.textContent = holding === null ? "none" : `${fmt(holding, 3)}/255`;
  text.append("Smallest flipping eps: ", a, " · largest holding eps: ", b,
              ` · grid ${search.grid_255.join(", ")} /255, resolution ${search.resolution_255}/255 · ${search.note}`);
}

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(Math.round(v / step) * step);
  return ticks;
}

// ---- helpers and start -------------------------------------------------------------------------
function fmt(v, digits) {
  const s = Number(v).toFixed(digits);
  const t = s.includes(".") ? s.replace(/\.?0+$/, "") : s;
  return t === "-0" ? "0" : t;
}
function pct(p) { return `${(100 * p).toFixed(1)}%`; }
function fmtBytes(n) { return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`; }

function setupKey() {
  const input = $("api-key");
  input.value = sessionStorage.getItem(KEY_STORE) || "";
  input.addEventListener("change", () => {
    const key = input.value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    loadInfo();
  });
  $("forget-key").addEventListener("click", () => {
    input.value = "";
    sessionStorage.removeItem(KEY_STORE);
  });
}

window.addEventListener("unhandledrejection", (e) => showError(`Unexpected error: ${e.reason}`));
document.addEventListener("DOMContentLoaded", () => {
  setupKey();
  setupDrop();
  fillEps(32 / 255);
  $("classify").addEventListener("click", classify);
  $("probe").addEventListener("click", probe);
  $("labels").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) classify();
  });
  loadInfo();
});
