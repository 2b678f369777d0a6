// The "look inside" views, drawn in the browser by Plotly from the numbers the server sends once per reply
// (minigpt/serve/reply_numbers.py, in the hidden #inspect_data element). Selecting a token, a view, a layer
// or a head, or hiding the attention sink, redraws here with no request to the server. Only branching
// from an alternative asks the server (it generates): through the hidden #branch_request box and #branch_go.
(() => {
  "use strict";
  const state = {data: null, position: 1, view: "sampling", layer: 0, head: -1, hideSink: false, source: null};
  const PINK = "#e91e63", BLUE = "#5c6bc0", GRAY = "#9e9e9e", SELECTED = "#29b6f6";
  const CONFIG = {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
  const FAMILY = '"Open Sans", verdana, arial, sans-serif', FONT = {size: 11, family: FAMILY};  // Plotly's own
  // A chart's title just above its plot, under the top margin's first 26 px, where Plotly puts its tool bar
  // (zoom, pan, reset): on a phone's narrow chart a centred title ran under the bar.
  const TITLE_MARGIN = 52;
  const title = (text, size) => ({text, font: {size}, yref: "paper", y: 1, yanchor: "bottom", pad: {b: 6}});
  // Colour scales that read at a glance: white = nothing, dark = much. Gray behind them: cells not computed
  // (a key in the row's future).
  const ATTENTION = [[0, "#ffffff"], [0.1, "#c5cae9"], [1, "#1a237e"]];
  const SIMILAR = [[0, "#ffffff"], [1, "#b71c1c"]];
  const MASKED = "#e0e0e0";

  // -- the numbers ----------------------------------------------------------------------------------
  function half(bits) {  // one IEEE float16 -> number (where Float16Array is missing)
    const sign = bits & 0x8000 ? -1 : 1, exp = (bits >> 10) & 0x1f, frac = bits & 0x3ff;
    if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }
  function unpack(p) {  // {"dtype", "shape", "b64"} -> {values, shape, at(...index)}
    const bytes = Uint8Array.from(atob(p.b64), (c) => c.charCodeAt(0)).buffer;
    let values;
    if (p.dtype === "float16") {
      values = typeof Float16Array === "function" ? new Float16Array(bytes) : Array.from(new Uint16Array(bytes), half);
    } else {
      values = new {float32: Float32Array, uint16: Uint16Array}[p.dtype](bytes);
    }
    const strides = p.shape.map((_, i) => p.shape.slice(i + 1).reduce((a, b) => a * b, 1));
    return {values, shape: p.shape, at: (...i) => values[i.reduce((a, x, k) => a + x * strides[k], 0)]};
  }
  function unpackAll(d) {
    if (!d.tokens) return d;
    for (const group of [d.lens, d.attention, d.sampling]) {
      for (const [k, v] of Object.entries(group)) if (v && v.b64 !== undefined) group[k] = unpack(v);
    }
    d.sequence = [...d.prompt, ...d.tokens.slice(0, -1)];  // the keys of the attention rows
    return d;
  }

  // -- text -----------------------------------------------------------------------------------------
  const esc = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const text = (id) => state.data.vocab[String(id)] ?? `#${id}`;
  const label = (id) => esc(text(id).replace(/\n/g, "\\n").replace(/ /g, "␣") || "∅");
  const shown = (id) => esc(text(id).replace(/\n/g, "↵\n"));
  const num = (p) => (p === 0 ? "0" : p >= 0.001 ? p.toFixed(4) : p.toExponential(2));
  const $ = (sel) => document.querySelector(sel);

  // -- the token panel, its caption and the alternatives ---------------------------------------------
  function drawReply() {
    const panel = $("#reply_panel");
    if (!panel) return;
    const d = state.data;
    if (!d || !d.tokens) {
      panel.querySelector(".reply-head").textContent = d ? d.note : "No reply yet: send a message.";
      for (const cls of [".tokens", ".caption", ".alternatives", ".legend"]) panel.querySelector(cls).innerHTML = "";
      return;
    }
    const n = d.tokens.length, i = state.position - 1;
    panel.querySelector(".reply-head").textContent =
      `Last reply: ${n} tokens from ${d.model}. Click a token (or use ← →) to look inside.`;
    const colours = Object.fromEntries(d.bands);
    panel.querySelector(".legend").innerHTML = d.bands.map(([l, c]) =>
      `<span class="band"><i style="background:${c}"></i>${esc(l)}</span>`).join("");
    panel.querySelector(".tokens").innerHTML = d.tokens.map((t, k) =>
      `<span class="tok${k === i ? " selected" : ""}" data-i="${k + 1}" title="p = ${num(d.p[k])}" ` +
      `style="background:${colours[d.band[k]]}">${shown(t)}</span>`).join("");
    panel.querySelector(".caption").innerHTML = `Token ${state.position} of ${n}: chose <code>${label(d.tokens[i])}</code> ` +
      `with p = ${num(d.p[i])}. Top ${d.top[i].length} alternatives, raw model distribution (temperature 1, ` +
      `before top-k/top-p); click one to branch from it:`;
    panel.querySelector(".alternatives").innerHTML = d.top[i].map(([id, p]) =>
      `<button class="alt${id === d.tokens[i] ? " chosen" : ""}" data-token="${id}" title="branch: continue with this token">` +
      `<span class="alt-text">${label(id)}</span><span class="alt-bar" style="width:${(100 * p).toFixed(1)}%"></span>` +
      `<span class="alt-p">${(100 * p).toFixed(1)}%</span></button>`).join("");
    panel.querySelector(".tok.selected")?.scrollIntoView({block: "nearest"});
  }

  // -- the views ------------------------------------------------------------------------------------
  function drawView() {
    const views = $("#views_panel");
    if (!views) return;
    for (const tab of views.querySelectorAll("[role=tab]")) {
      tab.setAttribute("aria-selected", String(tab.dataset.view === state.view));
    }
    for (const pane of views.querySelectorAll(".view")) pane.hidden = pane.dataset.view !== state.view;
    const d = state.data, pane = views.querySelector(`.view[data-view=${state.view}]`);
    if (!d || !d.tokens) {
      for (const chart of views.querySelectorAll(".chart, .entropy, .similarity")) if (window.Plotly) Plotly.purge(chart);
      for (const note of views.querySelectorAll(".note")) note.textContent = d ? d.note : "No reply yet.";
      return;
    }
    if (!window.Plotly) {  // still loading (Gradio adds the page's scripts in no set order): draw when it has
      if (!state.waiting) state.waiting = setTimeout(() => { state.waiting = null; drawView(); }, 100);
      return;
    }
    ({sampling: drawSampling, lens: drawLens, attention: drawAttention, timeline: drawTimeline})[state.view](pane, d);
  }

  // The stage charts wrap into rows: as many columns as the widest stage name fits (so a sampler with every
  // stage on, or a phone, gets more rows), each with its own axes; the token names label the first column.
  // The page redraws it when the window's width changes.
  const STAGE = {gap: 18, title: 34, bars: 150, ticks: 24};  // px: between columns; a row's title, bars and ticks
  function drawSampling(pane, d) {
    const s = d.sampling, i = state.position - 1, ids = s.shown[i], drawn = d.tokens[i];
    const names = s.stages, n = names.length;
    const y = ids.map(label), axis = (k) => (k ? k + 1 : "");
    const chart = pane.querySelector(".chart"), margin = {l: 80, r: 10, t: 10, b: 40};
    const width = Math.max(chart.clientWidth - margin.l - margin.r, 1);
    const widest = Math.max(...names.map((name) => textWidth(name, `bold ${FONT.size}px ${FAMILY}`)));
    const columns = Math.max(1, Math.min(n, Math.floor((width + STAGE.gap) / (widest + STAGE.gap))));
    const rows = Math.ceil(n / columns), cell = (width - (columns - 1) * STAGE.gap) / columns;
    const height = rows * (STAGE.title + STAGE.bars) + (rows - 1) * STAGE.ticks;  // the plot area's
    const layout = {height: height + margin.t + margin.b, font: FONT, bargap: 0.15, margin, annotations: []};
    const traces = names.map((name, k) => {
      const row = Math.floor(k / columns), column = k % columns;
      const top = height - row * (STAGE.title + STAGE.bars + STAGE.ticks) - STAGE.title;
      const left = column * (cell + STAGE.gap);
      layout[`xaxis${axis(k)}`] = {domain: [left / width, (left + cell) / width], anchor: `y${axis(k)}`, range: [0, 1],
        tickvals: [0, 0.5, 1], title: {text: row === rows - 1 ? "p" : ""}};
      layout[`yaxis${axis(k)}`] = {domain: [(top - STAGE.bars) / height, top / height], anchor: `x${axis(k)}`,
        autorange: "reversed", showticklabels: column === 0, title: {text: k ? "" : "token"}};
      layout.annotations.push({text: `<b>${esc(name)}</b><br>${s.left[i][k].toLocaleString()} left`,
        xref: `x${axis(k)} domain`, yref: `y${axis(k)} domain`, x: 0.5, y: 1, yanchor: "bottom", showarrow: false});
      return {type: "bar", orientation: "h", x: ids.map((_, j) => s.shown_p.at(i, k, j)), y,
        xaxis: `x${axis(k)}`, yaxis: `y${axis(k)}`, name, showlegend: false,
        marker: {color: ids.map((id) => (id === drawn ? PINK : BLUE))},
        customdata: ids.map((_, j) => num(s.shown_p.at(i, k, j))),
        hovertemplate: `<b>%{y}</b><br>${esc(name)}: p = %{customdata}<extra></extra>`};
    });
    // Sized here, not by Plotly's responsive mode: its resize would keep the old height for the new rows.
    Plotly.react(chart, traces, {...layout, width: chart.clientWidth}, {...CONFIG, responsive: false});
    const settings = names.map((name, k) => {
      const v = s.settings[name];
      return `${esc(name)}${v === null || v === undefined ? "" : " " + v}: <b>${s.left[i][k].toLocaleString()}</b>`;
    });
    const final = s.shown_p.at(i, n - 1, ids.indexOf(drawn));
    pane.querySelector(".note").innerHTML = `Tokens left at each stage: ${settings.join(" → ")}. Drawn: ` +
      `<code>${label(drawn)}</code> (p = ${num(final)} in the final distribution). Bars: the raw distribution's ` +
      `top ${ids.length}, the drawn token in pink.`;
  }

  function drawLens(pane, d) {
    const L = d.lens, layers = L.layers, n = d.tokens.length, i = state.position - 1;
    const chart = pane.querySelector(".chart");
    const range = windowAround(state.position, n, 8);
    const shapes = [outline(state.position - 0.5, state.position + 0.5, -0.5, layers.length - 0.5)];
    if (chart.__drawn === state.source && chart.data) {  // the same numbers: move the window and the outline only
      Plotly.relayout(chart, {"xaxis.range": range, shapes});
    } else {
      drawLensChart(chart, d, range, shapes);
      chart.__drawn = state.source;
    }
    lensTable(pane, d);
  }

  function drawLensChart(chart, d, range, shapes) {
    const L = d.lens, layers = L.layers;
    const x = d.tokens.map((_, c) => c + 1);
    const z = layers.map((_, l) => x.map((_, c) => L.target_p.at(l, c)));
    const cellText = layers.map((_, l) => x.map((_, c) => label(L.top_ids.at(l, c, 0)).slice(0, 6)));
    const hover = layers.map((name, l) => x.map((_, c) => {
      const tops = [0, 1, 2, 3, 4].map((k) => `${label(L.top_ids.at(l, c, k))} ${num(L.top_p.at(l, c, k))}`);
      return `<b>${esc(name)}</b>, token ${c + 1}: after ${label(c ? d.tokens[c - 1] : d.prompt[d.prompt.length - 1])}` +
        ` came ${label(d.tokens[c])}<br>p(it) = ${num(L.target_p.at(l, c))}, rank ${L.target_rank.at(l, c)}` +
        `<br>top 5: ${tops.join(", ")}`;
    }));
    const trace = {type: "heatmap", x, y: layers, z, text: cellText, texttemplate: "%{text}", textfont: {size: 9},
      customdata: hover, hovertemplate: "%{customdata}<extra></extra>", colorscale: "Viridis", zmin: 0, zmax: 1,
      colorbar: {title: {text: "p(token that<br>came next)", side: "right"}, thickness: 12}};
    const layout = {height: 420, font: FONT, margin: {l: 80, r: 10, t: 10, b: 60},
      xaxis: {title: {text: "reply token (the column predicts it)"}, range, tickvals: x, ticktext: d.tokens.map(label)},
      yaxis: {title: {text: "layer read out"}, fixedrange: true}, shapes};
    plotWithClicks(chart, [trace], layout, (pt) => select(pt.x));
  }

  function lensTable(pane, d) {
    const L = d.lens, layers = L.layers, i = state.position - 1;
    const rows = layers.map((name, l) => `<tr><td>${esc(name)}</td><td><code>${label(L.top_ids.at(l, i, 0))}</code></td>` +
      `<td>${num(L.top_p.at(l, i, 0))}</td><td>${num(L.target_p.at(l, i))}</td><td>${L.target_rank.at(l, i)}</td></tr>`);
    pane.querySelector(".note").innerHTML = `Token ${state.position}: what each layer predicts, read out through the ` +
      `final LayerNorm and lm_head. Colour: the probability of the token that came next (<code>${label(d.tokens[i])}</code>); ` +
      `text: the layer's top-1. Drag to zoom, double-click to reset.<table class="lens-table"><thead><tr><th>layer</th>` +
      `<th>top-1</th><th>p(top-1)</th><th>p(next)</th><th>rank of next</th></tr></thead><tbody>${rows.reverse().join("")}</tbody></table>`;
  }

  const ROWS = 40, KEYS = 96;  // the heatmap's window: rows around the selected token, the keys they saw last

  function attentionWindow(d) {  // the chosen layer and head (or average) over the window, dense (null: not computed)
    const A = d.attention, n = d.tokens.length, head = state.head < 0 ? A.heads : state.head, layer = state.layer;
    const [r0, r1] = windowAround(state.position, n, ROWS).map((v) => Math.round(v + 0.5) - 1);  // rows r0..r1-1
    const first = state.hideSink ? 1 : 0, k1 = d.prompt.length + r1 - 1, k0 = Math.max(first, k1 - KEYS);
    const z = [];
    for (let r = r0; r < r1; r++) {
      const visible = d.prompt.length + r;  // the keys this row could see: 0 .. visible - 1
      const row = Array.from({length: k1 - k0}, (_, j) => (k0 + j < visible ? 0 : null));
      const scale = state.hideSink ? 1 - A.sink.at(layer, head, r) : 1;
      for (let k = 0; k < A.top_keys; k++) {
        const key = A.key_ids.at(layer, head, r, k);
        if (key >= k0 && key < k1 && key < visible) row[key - k0] = scale > 0 ? A.key_p.at(layer, head, r, k) / scale : 0;
      }
      z.push(row);
    }
    return {z, r0, r1, k0, k1};
  }

  function drawAttention(pane, d) {
    const A = d.attention, n = d.tokens.length, {z, r0, r1, k0, k1} = attentionWindow(d);
    const keyLabels = d.sequence.slice(k0, k1).map((id, j) => `${k0 + j}: ${label(id)}`);
    const rowLabels = d.tokens.slice(r0, r1).map((id, j) => `${r0 + j + 1}: ${label(id)}`);
    const heatmap = {type: "heatmap", z, x: keyLabels, y: rowLabels, colorscale: ATTENTION, zmin: 0, hoverongaps: false,
      colorbar: {title: {text: "attention<br>probability", side: "right"}, thickness: 12},
      hovertemplate: "reply token %{y}<br>looks at %{x}<br>p = %{z:.4f}<extra></extra>"};
    const headName = state.head < 0 ? "average over heads" : `head ${state.head + 1}`;
    const row = state.position - 1 - r0;
    plotWithClicks(pane.querySelector(".chart"), [heatmap], {height: 460, font: FONT, plot_bgcolor: MASKED,
      title: title(`Layer ${state.layer + 1}, ${headName}`, 12),
      margin: {l: 110, r: 10, t: TITLE_MARGIN, b: 110},
      xaxis: {title: {text: "key token (what was looked at)"}},
      yaxis: {title: {text: "reply token (being chosen)"}, autorange: "reversed"},
      shapes: [outline(-0.5, k1 - k0 - 0.5, row - 0.5, row + 0.5)]},
      (pt) => select(Number(String(pt.y).split(":")[0])));
    const heads = pane.querySelector(".heads"), drawn = `${state.layer}|${state.head}|${state.hideSink}`;
    if (heads.__drawn !== drawn || heads.__source !== state.source || !pane.querySelector(".entropy").data) {
      drawHeads(pane, d);
      heads.__drawn = drawn;
      heads.__source = state.source;
    }
    attentionNote(pane, d, r0, r1, k0, k1);
  }

  function drawHeads(pane, d) {  // the entropy grid and the head similarity: they follow the layer, head and sink
    const A = d.attention;
    const sink = state.hideSink ? "_sinkless" : "";
    const entropy = A[`entropy${sink}`], heads = entropy[0].map((_, h) => h + 1), layers = entropy.map((_, l) => l + 1);
    plotWithClicks(pane.querySelector(".entropy"), [{type: "heatmap", z: entropy, x: heads, y: layers,
      colorscale: "Viridis", zmin: 0, zmax: Math.log(A.keys), colorbar: {title: {text: "nats"}, thickness: 10,
        tickformat: ".1f"},
      hovertemplate: "layer %{y}, head %{x}<br>entropy %{z:.3f} nats<extra></extra>"}],
      {height: 300, font: FONT, title: title(`Attention entropy: 0 = one token, ${Math.log(A.keys).toFixed(1)} = all ` +
        `${A.keys} evenly`, 11),
        margin: {l: 45, r: 5, t: TITLE_MARGIN, b: 40}, xaxis: {title: {text: "head"}, dtick: 1}, yaxis: {title: {text: "layer"}, dtick: 1},
        shapes: state.head < 0 ? [] : [outline(state.head + 0.5, state.head + 1.5, state.layer + 0.5, state.layer + 1.5)]},
      (pt) => { state.layer = pt.y - 1; state.head = pt.x - 1; syncControls(); drawView(); });
    const similarity = A[`similarity${sink}`][state.layer];
    plotWithClicks(pane.querySelector(".similarity"), [{type: "heatmap", z: similarity, x: heads, y: heads,
      colorscale: SIMILAR, zmin: 0, zmax: 1, colorbar: {title: {text: "cosine"}, thickness: 10},
      hovertemplate: "heads %{y} and %{x}<br>cosine similarity %{z:.3f}<extra></extra>"}],
      {height: 300, font: FONT, title: title(`Layer ${state.layer + 1}: head similarity`, 11),
        margin: {l: 45, r: 5, t: TITLE_MARGIN, b: 40}, xaxis: {title: {text: "head"}, dtick: 1},
        yaxis: {title: {text: "head"}, dtick: 1, autorange: "reversed"}},
      (pt) => { state.head = pt.y - 1; syncControls(); drawView(); });
  }

  function attentionNote(pane, d, r0, r1, k0, k1) {
    const A = d.attention, n = d.tokens.length;
    const shownKeys = A.top_keys < A.keys ? ` Each row's ${A.top_keys} largest keys are sent; blank cells in its past ` +
      `are below those (0 shown).` : "";
    const rows = r1 - r0 < n ? `reply tokens ${r0 + 1}-${r1} of ${n}` : `all ${n} reply tokens`;
    const keys = k1 - k0 < A.keys ? `context tokens ${k0}-${k1 - 1} of ${A.keys}` : `the ${A.keys} context tokens`;
    pane.querySelector(".note").textContent = `Rows: ${rows} (token ${state.position} outlined; select another ` +
      `token to move the window). Columns: ${keys}.${shownKeys}` +
      (state.hideSink ? " The first token is hidden and each row renormalised." : "");
  }

  function drawTimeline(pane, d) {
    const ms = d.timeline_ms, chart = pane.querySelector(".chart");
    if (!ms.length) {
      Plotly.purge(chart);
      pane.querySelector(".note").textContent = "No timings: this reply was loaded from a file without them.";
      return;
    }
    const x = ms.map((_, k) => k + 1), n = ms.length;
    const colours = x.map((k) => (k === state.position ? PINK : k === 1 ? GRAY : BLUE));
    plotWithClicks(chart, [{type: "bar", x, y: ms, marker: {color: colours},
      customdata: d.tokens.map(label), hovertemplate: "token %{x}: %{customdata}<br>%{y:.1f} ms<extra></extra>"}],
      {height: 280, font: FONT, margin: {l: 55, r: 10, t: 10, b: 45}, bargap: 0.1,
        xaxis: {title: {text: "reply token (the first bar includes reading the prompt)"}, range: [0.5, n + 0.5]},
        yaxis: {title: {text: "ms (log scale)"}, type: "log"}}, (pt) => select(pt.x));
    const sorted = ms.slice(1).sort((a, b) => a - b), median = sorted[Math.floor(sorted.length / 2)];
    const total = ms.reduce((a, b) => a + b, 0);
    pane.querySelector(".note").textContent = `Prompt (${d.prompt.length} tokens) + first token: ${ms[0].toFixed(0)} ms` +
      (sorted.length ? ` · median step ${median.toFixed(1)} ms · decode ${(1000 / median).toFixed(1)} tokens/s` : "") +
      ` · total ${total.toFixed(0)} ms`;
  }

  // -- helpers --------------------------------------------------------------------------------------
  function windowAround(position, n, width) {  // an axis range of `width` cells around position (1-based)
    const start = Math.min(Math.max(position - width / 2, 1), Math.max(n - width + 1, 1));
    return [start - 0.5, Math.min(start + width - 1, n) + 0.5];
  }
  const measure = document.createElement("canvas").getContext("2d");
  function textWidth(text, font) {  // px, as the browser will draw it
    measure.font = font;
    return measure.measureText(text).width;
  }
  function outline(x0, x1, y0, y1) {
    return {type: "rect", x0, x1, y0, y1, line: {color: SELECTED, width: 2.5}, xref: "x", yref: "y"};
  }
  function plotWithClicks(el, traces, layout, onClick) {
    Plotly.react(el, traces, layout, CONFIG);
    el.__onClick = onClick;  // one listener per chart, calling whatever the last draw wanted
    if (!el.__listening) {
      el.on("plotly_click", (e) => e.points?.length && el.__onClick(e.points[0]));
      el.__listening = true;
    }
  }
  function syncControls() {
    const layer = $("#att_layer"), head = $("#att_head");
    if (layer) layer.value = String(state.layer);
    if (head) head.value = String(state.head);
  }

  // -- events ---------------------------------------------------------------------------------------
  function select(position) {
    const n = state.data?.tokens?.length;
    if (!n || !(position >= 1 && position <= n)) return;
    state.position = position;
    drawReply();
    drawView();
  }

  function branch(token) {  // the one click that asks the server: it generates from here
    const box = $("#branch_request textarea, #branch_request input");
    if (!box || !state.data?.tokens) return;
    box.value = `${state.data.key}:${state.position}:${token}`;
    box.dispatchEvent(new Event("input", {bubbles: true}));
    setTimeout(() => $("#branch_go")?.click(), 0);
  }

  function fillControls() {  // the attention view's layer and head choices, for this model's shape
    const layer = $("#att_layer"), head = $("#att_head"), A = state.data?.attention;
    if (!layer || !A) return;
    const layers = A.entropy.length;
    if (layer.options.length !== layers) {
      layer.innerHTML = A.entropy.map((_, l) => `<option value="${l}">Layer ${l + 1}</option>`).join("");
      head.innerHTML = `<option value="-1">Average over heads</option>` +
        Array.from({length: A.heads}, (_, h) => `<option value="${h}">Head ${h + 1}</option>`).join("");
    }
    state.layer = Math.min(state.layer, layers - 1);
    state.head = Math.min(state.head, A.heads - 1);
    syncControls();
  }

  function onPayload() {
    const el = $("#inspect_data .payload");
    const undo = $("#reply_panel .undo-branch");
    if (undo) undo.disabled = !el?.dataset.branched;
    const source = el ? el.textContent : "";  // every change of the page comes here: mostly nothing new
    if (source === state.source) return;
    state.source = source;
    state.data = source ? unpackAll(JSON.parse(source)) : null;
    state.position = state.data?.tokens ? (state.data.select || state.data.tokens.length) : 1;
    fillControls();
    drawReply();
    drawView();
  }

  document.addEventListener("click", (e) => {
    const tok = e.target.closest("#reply_panel .tok");
    if (tok) return select(Number(tok.dataset.i));
    const alt = e.target.closest("#reply_panel .alt");
    if (alt) return branch(Number(alt.dataset.token));
    if (e.target.closest("#reply_panel .undo-branch")) return $("#undo_branch")?.click();
    const tab = e.target.closest("#views_panel [role=tab]");
    if (tab) { state.view = tab.dataset.view; drawView(); }
  });
  document.addEventListener("change", (e) => {
    if (e.target.id === "att_layer") state.layer = Number(e.target.value);
    else if (e.target.id === "att_head") state.head = Number(e.target.value);
    else if (e.target.id === "att_sink") state.hideSink = e.target.checked;
    else return;
    drawView();
  });
  window.addEventListener("resize", () => state.view === "sampling" && drawView());  // its columns follow the width
  document.addEventListener("keydown", (e) => {
    if (!e.target.closest?.("#reply_panel") || !["ArrowLeft", "ArrowRight"].includes(e.key)) return;
    e.preventDefault();
    select(state.position + (e.key === "ArrowRight" ? 1 : -1));
  });
  new MutationObserver(() => {
    onPayload();
    const panel = $("#reply_panel");
    if (panel && !panel.dataset.drawn) {  // the panels' markup has (re)appeared: draw into it
      panel.dataset.drawn = "1";
      state.source = null;
      onPayload();
      drawReply();
      drawView();
    }
  }).observe(document.documentElement, {subtree: true, childList: true, characterData: true});
  window.minigptInspect = {state, select, drawView, unpackAll, label};  // for tests, benches and the curious
})();
