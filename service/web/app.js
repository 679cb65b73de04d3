// Bone-fracture detection: the page served at `/` (plain ES2020, no build step, no external resources).
//
// Talks to the same origin only: GET /v1/models, POST /api/analysis (one XHR per file, for upload
// progress), GET /api/analysis (history) and GET /api/analysis/{id}. Research use only: every report shows
// the disclaimer, and output of an untrained model is flagged wherever it appears.
//
// Every string that comes from a user or the server (image names, reasons, warnings) goes into the DOM as
// text (textContent), never as HTML: an image name is attacker-controlled.

const HISTORY_PAGE_SIZE = 10;
const MAX_PARALLEL_UPLOADS = 3; // the service has a bounded queue; a big drop should not fill it alone
const API_KEY_STORAGE = "bfd-api-key";
const UNTRAINED_TEXT = "UNTRAINED MODEL — answers are meaningless";

const state = {
  disclaimer: document.getElementById("disclaimer").textContent.trim(),
  history: { offset: 0, total: 0, imageName: "" },
  objectUrls: new Set(),
  queue: [],
  running: 0,
};

// ---------------------------------------------------------------- small helpers

/** Create an element: h("p", {class: "x", dataset: {testid: "y"}}, "text", child). */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    // Through the CSSOM: the Content-Security-Policy (style-src 'self') blocks style attributes set as markup.
    else if (key === "style") node.style.cssText = String(value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const percent = (p) => (p === null || p === undefined ? "n/a" : `${(p * 100).toFixed(1)}%`);

function formatTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function apiHeaders() {
  const key = sessionStorage.getItem(API_KEY_STORAGE);
  return key ? { "X-API-Key": key } : {};
}

/** A readable sentence from an error answer ({detail, code, status}) or a bare status. */
function errorMessage(status, body, retryAfter) {
  let detail = body && body.detail;
  if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  let message = detail ? String(detail) : `the service answered HTTP ${status}`;
  if (status === 401 || status === 403) message += " (enter the deployment's key under “API key”)";
  if (status === 503 && retryAfter) message += ` — try again in ${retryAfter} s`;
  return message;
}

async function getJSON(url) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json", ...apiHeaders() } });
  } catch (error) {
    throw new Error(`the service could not be reached (${error.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's HTML error page): the status alone says enough
  }
  if (!response.ok) throw new Error(errorMessage(response.status, body, response.headers.get("Retry-After")));
  return body;
}

function setDisclaimer(text) {
  if (!text) return;
  state.disclaimer = text;
  document.getElementById("disclaimer").textContent = text;
  document.getElementById("footer-disclaimer").textContent = text;
}

// ---------------------------------------------------------------- model header

async function loadModel() {
  const info = document.getElementById("model-info");
  let model;
  try {
    model = await getJSON("/v1/models");
  } catch (error) {
    info.textContent = `Model: unknown (${error.message})`;
    return;
  }
  setDisclaimer(model.disclaimer);
  info.textContent = `Model: ${model.name} ${model.version} · ${model.precision} · ${model.graph}`;
  info.dataset.version = model.version;
  const banner = document.getElementById("untrained-banner");
  banner.hidden = model.trained !== false;
  const select = document.getElementById("body-part");
  const chosen = select.value;
  // Called again after an API key is entered: rebuild the list rather than append to it.
  select.replaceChildren(select.options[0], ...(model.body_parts || []).map((part) => h("option", { value: part }, part)));
  select.value = chosen;
}

// ---------------------------------------------------------------- uploads

function enqueue(files) {
  const container = document.getElementById("reports");
  for (const file of files) {
    const card = h("article", { class: "report pending", dataset: { testid: "upload-card" } });
    container.prepend(card);
    state.queue.push({ file, card, bodyPart: document.getElementById("body-part").value,
      heatmap: document.getElementById("want-heatmap").checked });
    renderPending(card, file, 0, "Waiting…");
  }
  pump();
}

function pump() {
  while (state.running < MAX_PARALLEL_UPLOADS && state.queue.length) {
    const job = state.queue.shift();
    state.running += 1;
    upload(job).finally(() => {
      state.running -= 1;
      pump();
    });
  }
}

function renderPending(card, file, fraction, text) {
  const progress = h("progress", { max: 1, value: fraction, dataset: { testid: "upload-progress" },
    "aria-label": `Upload of ${file.name}` });
  card.replaceChildren(
    h("h3", {}, file.name),
    progress,
    h("p", { class: "status", dataset: { testid: "upload-status" } }, text),
    h("p", { class: "card-disclaimer" }, state.disclaimer),
  );
}

/** POST one file; XMLHttpRequest rather than fetch because only XHR reports upload progress. */
function upload({ file, card, bodyPart, heatmap }) {
  return new Promise((resolve) => {
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("image_name", file.name);
    if (heatmap) form.append("heatmap", "true");
    if (bodyPart) form.append("body_part", bodyPart);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/analysis");
    xhr.setRequestHeader("Accept", "application/json");
    for (const [name, value] of Object.entries(apiHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => {
      if (!event.lengthComputable) return;
      const fraction = event.loaded / event.total;
      const bar = card.querySelector("progress");
      const status = card.querySelector(".status");
      if (bar) bar.value = fraction;
      if (status) status.textContent = `Uploading… ${Math.round(fraction * 100)}%`;
    };
    xhr.upload.onload = () => {
      // The bytes are sent; the answer comes once the image has been analysed.
      const status = card.querySelector(".status");
      const bar = card.querySelector("progress");
      if (bar) bar.value = 1;
      if (status) status.textContent = "Analysing…";
    };
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // handled below as a status-only error
      }
      if (xhr.status === 201 || xhr.status === 200) {
        // The original is shown next to the overlay; a browser cannot draw DICOM, so then only the overlay.
        const isDicom = file.type === "application/dicom" || /\.dcm$/i.test(file.name) || body?.result?.dicom;
        let originalUrl = null;
        if (!isDicom && /^image\/(png|jpeg)$/.test(file.type)) {
          originalUrl = URL.createObjectURL(file);
          state.objectUrls.add(originalUrl);
        }
        card.replaceWith(renderReport(body, { originalUrl }));
        if (!document.getElementById("panel-history").hidden) loadHistory();
      } else {
        renderError(card, file.name, errorMessage(xhr.status, body, xhr.getResponseHeader("Retry-After")));
      }
      resolve();
    };
    xhr.onerror = () => {
      renderError(card, file.name, "the service could not be reached (network error)");
      resolve();
    };
    xhr.send(form);
  });
}

function renderError(card, name, message) {
  card.className = "report error";
  card.dataset.testid = "upload-card";
  card.replaceChildren(
    h("h3", {}, name),
    h("p", { class: "error-message", role: "alert", dataset: { testid: "upload-error" } }, `Not analysed: ${message}`),
    h("p", { class: "card-disclaimer" }, state.disclaimer),
  );
}

// ---------------------------------------------------------------- report card

/** A report from an AnalysisRecord; `originalUrl` is an object URL of the uploaded PNG/JPEG, if any. */
function renderReport(record, { originalUrl = null } = {}) {
  const result = record.result;
  const untrained = result.model.trained === false || record.trained === false;
  const card = h("article", {
    class: `report${untrained ? " untrained" : ""}${result.abstained ? " abstained" : ""}`,
    dataset: { testid: "report-card", analysisId: record.id },
    "aria-label": `Report for ${record.image_name}`,
  });

  card.append(h("h3", { dataset: { testid: "report-name" } }, record.image_name));
  if (untrained) {
    card.append(h("p", { class: "card-untrained", role: "alert", dataset: { testid: "card-untrained" } },
      `${UNTRAINED_TEXT}: not a result.`));
  }
  if (result.abstained) {
    card.append(h("p", { class: "abstained-notice", role: "alert", dataset: { testid: "abstained" } },
      h("strong", {}, "Abstained: the label below is not usable. "),
      result.abstention_reason || "the model is out of its depth on this image"));
  }

  // The answer in words: the core's own sentences, the same the desktop and the DICOM outputs show.
  const summary = (result.summary && result.summary.lines) || [];
  if (summary.length) {
    card.append(h("ul", { class: "summary", dataset: { testid: "summary" }, "aria-label": "Summary" },
      summary.map((line) => h("li", {}, line))));
  }
  card.append(h("dl", { class: "facts" },
    bodyPartFacts(result.body_part),
    fractureFacts(result.fracture, result.abstained, untrained),
  ));
  card.append(heatmapView(result.heatmap, originalUrl, record.image_name));

  if (result.dicom) {
    const d = result.dicom;
    card.append(h("p", { class: "meta", dataset: { testid: "dicom-facts" } },
      `DICOM: ${d.photometric_interpretation}, ${d.bits_stored}-bit, transfer syntax ${d.transfer_syntax}`,
      d.body_part_examined ? `, BodyPartExamined ${d.body_part_examined}` : ""));
  }
  const warnings = result.warnings || [];
  if (warnings.length) {
    card.append(h("ul", { class: "warnings", dataset: { testid: "warnings" }, "aria-label": "Warnings" },
      warnings.map((w) => h("li", {}, w))));
  }
  const m = result.model;
  card.append(h("p", { class: "meta" },
    h("span", { dataset: { testid: "model-version" } }, `Model ${m.name} ${m.version}`),
    ` · ${m.precision} · ${m.graph}`,
    untrained ? h("span", { class: "badge danger" }, "untrained") : null,
    record.id !== undefined ? ` · analysis #${record.id}` : "",
    record.created_at ? ` · ${formatTime(record.created_at)}` : "",
  ));
  if (record.image_sha256) {
    card.append(h("p", { class: "meta mono", title: "sha256 of the uploaded file" },
      `sha256 ${record.image_sha256.slice(0, 16)}…`));
  }
  card.append(h("p", { class: "card-disclaimer", dataset: { testid: "card-disclaimer" } },
    result.disclaimer || record.disclaimer || state.disclaimer));
  return card;
}

function bodyPartFacts(part) {
  const sources = { router: "named by the router", client: "named by you", dicom: "from the DICOM header" };
  return [
    h("dt", {}, "Body part"),
    h("dd", { dataset: { testid: "body-part" } },
      h("strong", {}, part.label),
      // The probability is always the router's: say so when someone else named the part.
      part.probability === null || part.probability === undefined ? ""
        : part.source === "router" ? ` ${percent(part.probability)}` : ` (router: ${percent(part.probability)})`,
      h("span", { class: "source" }, ` (${sources[part.source] || part.source})`),
      part.router_label && part.router_label !== part.label
        ? h("span", { class: "badge warn", dataset: { testid: "router-disagrees" } },
          `router says ${part.router_label}`)
        : null),
  ];
}

function fractureFacts(fracture, abstained, untrained) {
  const p = fracture.probability;
  const t = fracture.threshold;
  const flags = [];
  // null means the bundle has no such operating point: say nothing rather than "no".
  if (fracture.suspicious !== null && fracture.suspicious !== undefined) {
    flags.push(h("span", { class: `badge ${fracture.suspicious ? "warn" : ""}`, dataset: { testid: "flag-suspicious" } },
      fracture.suspicious ? "suspicious" : "not suspicious"));
  }
  if (fracture.definite !== null && fracture.definite !== undefined) {
    flags.push(h("span", { class: `badge ${fracture.definite ? "danger" : ""}`, dataset: { testid: "flag-definite" } },
      fracture.definite ? "definite" : "not definite"));
  }
  const labelClass = abstained || untrained ? "label unusable" : `label ${fracture.label}`;
  const labelNote = abstained ? " (abstained: not usable)" : untrained ? " (untrained: meaningless)" : "";
  // The bar: P(fractured) as a fill, the part's decision threshold as a marker.
  const bar = h("div", {
    class: "prob-bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": 1, "aria-valuenow": p.toFixed(3),
    "aria-label": `P(fractured) ${percent(p)}, threshold ${percent(t)}`,
  },
  h("div", { class: `fill${p >= t ? " over" : ""}`, style: `width:${(p * 100).toFixed(1)}%` }),
  h("div", { class: "threshold", style: `left:${(t * 100).toFixed(1)}%`, title: `threshold ${percent(t)}` }));
  return [
    h("dt", {}, "Fracture"),
    h("dd", { dataset: { testid: "fracture" } },
      h("strong", { class: labelClass, dataset: { testid: "fracture-label" } }, fracture.label), labelNote,
      " · P(fractured) ",
      h("span", { dataset: { testid: "fracture-probability" } }, percent(p)),
      ` vs threshold ${percent(t)} `,
      flags,
      bar),
  ];
}

/** The overlay with an original/overlay toggle; stored results only have the grid, drawn as a table. */
function heatmapView(heatmap, originalUrl, name) {
  if (!heatmap) return h("p", { class: "meta" }, "No heatmap requested.");
  const figure = h("figure", { class: "heatmap", dataset: { testid: "heatmap" } });
  if (heatmap.overlay_png_base64) {
    const overlayUrl = `data:image/png;base64,${heatmap.overlay_png_base64}`;
    const img = h("img", { src: overlayUrl, alt: `Grad-CAM overlay for ${name}`, dataset: { testid: "heatmap-image" },
      width: heatmap.width, height: heatmap.height });
    figure.dataset.view = "overlay";
    figure.append(img);
    if (originalUrl) {
      const toggle = h("button", { type: "button", class: "secondary", "aria-pressed": "true",
        dataset: { testid: "heatmap-toggle" } }, "Show original");
      toggle.addEventListener("click", () => {
        const showOverlay = figure.dataset.view !== "overlay";
        figure.dataset.view = showOverlay ? "overlay" : "original";
        img.src = showOverlay ? overlayUrl : originalUrl;
        img.alt = showOverlay ? `Grad-CAM overlay for ${name}` : `Original image ${name}`;
        toggle.textContent = showOverlay ? "Show original" : "Show heatmap";
        toggle.setAttribute("aria-pressed", String(showOverlay));
      });
      figure.append(toggle);
    }
  } else if (heatmap.grid && heatmap.grid.length) {
    // Stored results drop the overlay PNG (it is derived); the coarse grid is what is kept.
    figure.dataset.view = "grid";
    figure.append(gridTable(heatmap.grid));
  }
  const gridNote = figure.dataset.view === "grid" ? " Stored result: the coarse grid only (blue 0 → red 1)." : "";
  figure.append(h("figcaption", {}, `Where the ${heatmap.body_part} specialist looks.${gridNote} ${heatmap.method}.`));
  return figure;
}

/** Blue (0) → red (1), the usual Grad-CAM reading. */
const heatColour = (v) => `hsl(${Math.round(240 * (1 - Math.min(1, Math.max(0, v))))} 85% 50%)`;

function gridTable(grid) {
  return h("table", { class: "grid", dataset: { testid: "heatmap-grid" },
    "aria-label": `Grad-CAM grid, ${grid.length} by ${grid[0].length}, values 0 to 1, rows top to bottom` },
  h("tbody", {}, grid.map((row) => h("tr", {}, row.map((v) =>
    h("td", { style: `background:${heatColour(v)}`, title: v.toFixed(2) }, h("span", { class: "visually-hidden" },
      v.toFixed(2))))))));
}

// ---------------------------------------------------------------- history

async function loadHistory() {
  const { offset, imageName } = state.history;
  const status = document.getElementById("history-status");
  const rows = document.getElementById("history-rows");
  const params = new URLSearchParams({ limit: HISTORY_PAGE_SIZE, offset });
  if (imageName) params.set("image_name", imageName);
  status.textContent = "Loading…";
  let page;
  try {
    page = await getJSON(`/api/analysis?${params}`);
  } catch (error) {
    status.textContent = `History unavailable: ${error.message}`;
    status.classList.add("error-message");
    return;
  }
  status.classList.remove("error-message");
  state.history.total = page.total;
  rows.replaceChildren(...page.items.map(historyRow));
  status.textContent = page.total
    ? `Analyses ${page.offset + 1}–${page.offset + page.items.length} of ${page.total}, newest first`
    : imageName ? `No analysis of “${imageName}”.` : "No analyses yet.";
  document.getElementById("history-newer").disabled = offset === 0;
  document.getElementById("history-older").disabled = offset + HISTORY_PAGE_SIZE >= page.total;
}

function historyRow(record) {
  const r = record.result;
  const untrained = record.trained === false || r.model.trained === false;
  const row = h("tr", { tabindex: 0, dataset: { testid: "history-row", analysisId: record.id },
    "aria-label": `Open analysis ${record.id} of ${record.image_name}` },
  h("td", {}, h("time", { datetime: record.created_at }, formatTime(record.created_at))),
  h("td", { dataset: { testid: "history-image-name" } }, record.image_name),
  h("td", {}, r.body_part.label, r.body_part.probability !== null ? ` ${percent(r.body_part.probability)}` : ""),
  h("td", {}, h("span", { class: r.abstained || untrained ? "label unusable" : `label ${r.fracture.label}` },
    r.fracture.label), ` ${percent(r.fracture.probability)}`),
  h("td", {}, r.abstained ? h("span", { class: "badge warn" }, "abstained") : "no"),
  h("td", {}, record.model_version, untrained ? h("span", { class: "badge danger" }, "untrained") : null));
  const open = () => showStored(record.id, row);
  row.addEventListener("click", open);
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      open();
    }
  });
  return row;
}

async function showStored(id, row) {
  const detail = document.getElementById("history-detail");
  for (const other of document.querySelectorAll("#history-rows tr")) other.removeAttribute("aria-current");
  row.setAttribute("aria-current", "true");
  detail.replaceChildren(h("p", { class: "status" }, "Loading…"));
  try {
    const record = await getJSON(`/api/analysis/${encodeURIComponent(id)}`);
    detail.replaceChildren(renderReport(record));
  } catch (error) {
    detail.replaceChildren(h("p", { class: "error-message", role: "alert", dataset: { testid: "history-error" } },
      `Could not load analysis ${id}: ${error.message}`));
  }
}

// ---------------------------------------------------------------- tabs and wiring

function selectTab(name) {
  for (const tab of ["analyse", "history"]) {
    const selected = tab === name;
    const button = document.getElementById(`tab-${tab}`);
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    document.getElementById(`panel-${tab}`).hidden = !selected;
  }
  if (name === "history") loadHistory();
}

function wire() {
  const dropZone = document.getElementById("drop-zone");
  const input = document.getElementById("file-input");

  // Without preventDefault on dragover the browser would not fire drop (and would open the file instead).
  for (const type of ["dragenter", "dragover"]) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      dropZone.classList.add("over");
    });
  }
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("over");
    const files = [...(event.dataTransfer?.files || [])];
    if (files.length) enqueue(files);
  });
  // A file dropped beside the zone should not navigate away from the page (and lose the reports).
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  dropZone.addEventListener("click", () => input.click());
  dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    enqueue([...input.files]);
    input.value = ""; // choosing the same file again should upload it again
  });

  document.getElementById("clear-reports").addEventListener("click", () => {
    document.getElementById("reports").replaceChildren();
    for (const url of state.objectUrls) URL.revokeObjectURL(url);
    state.objectUrls.clear();
  });

  const key = document.getElementById("api-key");
  key.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  document.getElementById("api-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (key.value.trim()) sessionStorage.setItem(API_KEY_STORAGE, key.value.trim());
    else sessionStorage.removeItem(API_KEY_STORAGE);
    loadModel();
  });

  const tabs = document.querySelectorAll('[role="tab"]');
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab.id.replace("tab-", "")));
    // Arrow keys move between tabs (the WAI-ARIA tabs pattern).
    tab.addEventListener("keydown", (event) => {
      if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
      const next = tab.id === "tab-analyse" ? "history" : "analyse";
      selectTab(next);
      document.getElementById(`tab-${next}`).focus();
    });
  }

  document.getElementById("history-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    state.history.imageName = document.getElementById("history-name").value.trim();
    state.history.offset = 0;
    loadHistory();
  });
  document.getElementById("history-refresh").addEventListener("click", loadHistory);
  document.getElementById("history-newer").addEventListener("click", () => {
    state.history.offset = Math.max(0, state.history.offset - HISTORY_PAGE_SIZE);
    loadHistory();
  });
  document.getElementById("history-older").addEventListener("click", () => {
    state.history.offset += HISTORY_PAGE_SIZE;
    loadHistory();
  });
}

wire();
loadModel();
