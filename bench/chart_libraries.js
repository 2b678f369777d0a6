// The three views that cost most to draw, from one reply's numbers, by three charting libraries Gradio can host,
// for bench/chart_libraries.py: the attention heatmap's window, the logit-lens grid and the sampler's stage bars.
// Every library gets the same cells, labels, colour scales and bars, axis titles, hover text and outline of the
// selected token; only the glue differs. The Plotly glue draws what minigpt/serve/inspect.js draws.
(() => {
  "use strict";
  const app = window.minigptInspect, label = (id) => app.label(id);
  const PINK = "#e91e63", BLUE = "#5c6bc0", SELECTED = "#29b6f6", MASKED = "#e0e0e0";
  const ATTENTION = ["#ffffff", "#c5cae9", "#1a237e"];  // at 0, a tenth and all of the scale, as in the app
  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
    "#b5de2b", "#fde725"];
  const WIDTH = 512, HEIGHT = {attention: 460, lens: 420, sampling: 260}, LAYER = 1;
  const ROWS = 40, KEYS = 96, COLUMNS = 8;  // the attention window, and the lens columns on screen
  const num = (p) => (p === 0 ? "0" : p >= 0.001 ? p.toFixed(4) : p.toExponential(2));

  // -- what each view shows: the same numbers for every library --------------------------------------
  function attention(d, position) {  // layer LAYER's average over heads in a ROWS x KEYS window; null: a future key
    const A = d.attention, n = d.tokens.length, head = A.heads;
    const r0 = Math.min(Math.max(position - ROWS / 2, 0), Math.max(n - ROWS, 0)), r1 = Math.min(r0 + ROWS, n);
    const k1 = d.prompt.length + r1 - 1, k0 = Math.max(0, k1 - KEYS);
    const z = [];
    for (let r = r0; r < r1; r++) {
      const visible = d.prompt.length + r, row = Array.from({length: k1 - k0}, (_, j) => (k0 + j < visible ? 0 : null));
      for (let k = 0; k < A.top_keys; k++) {
        const key = A.key_ids.at(LAYER, head, r, k);
        if (key >= k0 && key < k1 && key < visible) row[key - k0] = A.key_p.at(LAYER, head, r, k);
      }
      z.push(row);
    }
    return {z, r0, k0, selected: position - 1 - r0, zmax: Math.max(...z.flat()),
      keys: d.sequence.slice(k0, k1).map((id, j) => `${k0 + j}: ${label(id)}`),
      rows: d.tokens.slice(r0, r1).map((id, j) => `${r0 + j + 1}: ${label(id)}`)};
  }

  function lens(d) {  // layer x reply token: p of the token that came next, each layer's top-1, the hover text
    const L = d.lens, columns = d.tokens.map((_, c) => c + 1);
    return {layers: L.layers, columns, labels: d.tokens.map(label),
      z: L.layers.map((_, l) => columns.map((_, c) => L.target_p.at(l, c))),
      top1: L.layers.map((_, l) => columns.map((_, c) => label(L.top_ids.at(l, c, 0)).slice(0, 6))),
      hover: (l, c) => `${L.layers[l]}, token ${c + 1}: came ${label(d.tokens[c])}<br>p(it) = ${num(L.target_p.at(l, c))}, ` +
        `rank ${L.target_rank.at(l, c)}<br>top 5: ` +
        [0, 1, 2, 3, 4].map((k) => `${label(L.top_ids.at(l, c, k))} ${num(L.top_p.at(l, c, k))}`).join(", ")};
  }
  function lensWindow(position, n) {  // the COLUMNS columns around the selected one, as an axis range
    const start = Math.min(Math.max(position - COLUMNS / 2, 1), Math.max(n - COLUMNS + 1, 1));
    return [start - 0.5, Math.min(start + COLUMNS - 1, n) + 0.5];
  }

  function stages(d, position) {  // each stage's p of the raw top tokens (and the drawn one) at one position
    const s = d.sampling, i = position - 1, ids = s.shown[i];
    return {names: s.stages, left: s.left[i].map((v) => `${v.toLocaleString()} left`), tokens: ids.map(label),
      drawn: ids.indexOf(d.tokens[i]), p: s.stages.map((_, k) => ids.map((_, j) => s.shown_p.at(i, k, j)))};
  }

  // -- Plotly: as inspect.js ---------------------------------------------------------------------------
  const CONFIG = {displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
  const FONT = {size: 11};
  const outline = (x0, x1, y0, y1) => ({type: "rect", x0, x1, y0, y1, line: {color: SELECTED, width: 2.5}});
  const plotly = {
    clear: (el) => Plotly.purge(el),
    attention(el, d, position) {
      const a = attention(d, position);
      return Plotly.react(el, [{type: "heatmap", z: a.z, x: a.keys, y: a.rows, zmin: 0, hoverongaps: false,
        colorscale: [[0, ATTENTION[0]], [0.1, ATTENTION[1]], [1, ATTENTION[2]]],
        colorbar: {title: {text: "attention<br>probability", side: "right"}, thickness: 12},
        hovertemplate: "reply token %{y}<br>looks at %{x}<br>p = %{z:.4f}<extra></extra>"}],
      {width: WIDTH, height: HEIGHT.attention, font: FONT, plot_bgcolor: MASKED, margin: {l: 110, r: 10, t: 30, b: 110},
        title: {text: `Layer ${LAYER + 1}, average over heads`, font: {size: 12}},
        xaxis: {title: {text: "key token (what was looked at)"}},
        yaxis: {title: {text: "reply token (being chosen)"}, autorange: "reversed"},
        shapes: [outline(-0.5, a.keys.length - 0.5, a.selected - 0.5, a.selected + 0.5)]}, CONFIG);
    },
    lens(el, d, position, first) {
      const range = lensWindow(position, d.tokens.length);
      const shapes = [outline(position - 0.5, position + 0.5, -0.5, d.lens.layers.length - 0.5)];
      if (!first) return Plotly.relayout(el, {"xaxis.range": range, shapes});
      const g = lens(d);
      return Plotly.react(el, [{type: "heatmap", x: g.columns, y: g.layers, z: g.z, text: g.top1,
        texttemplate: "%{text}", textfont: {size: 9}, customdata: g.layers.map((_, l) => g.columns.map((_, c) => g.hover(l, c))),
        hovertemplate: "%{customdata}<extra></extra>", colorscale: "Viridis", zmin: 0, zmax: 1,
        colorbar: {title: {text: "p(token that<br>came next)", side: "right"}, thickness: 12}}],
      {width: WIDTH, height: HEIGHT.lens, font: FONT, margin: {l: 80, r: 10, t: 10, b: 60}, shapes,
        xaxis: {title: {text: "reply token (the column predicts it)"}, range, tickvals: g.columns, ticktext: g.labels},
        yaxis: {title: {text: "layer read out"}, fixedrange: true}}, CONFIG);
    },
    sampling(el, d, position) {
      const s = stages(d, position), n = s.names.length, axis = (k) => (k ? k + 1 : "");
      const layout = {width: WIDTH, height: HEIGHT.sampling, font: FONT, bargap: 0.15, grid: {rows: 1, columns: n},
        margin: {l: 80, r: 10, t: 45, b: 40}, annotations: s.names.map((name, k) => ({text: `<b>${name}</b><br>${s.left[k]}`,
          xref: `x${axis(k)} domain`, yref: "y domain", x: 0.5, y: 1, yanchor: "bottom", showarrow: false}))};
      s.names.forEach((_, k) => { layout[`xaxis${axis(k)}`] = {range: [0, 1], tickvals: [0, 0.5, 1], title: {text: "p"}}; });
      layout.yaxis = {autorange: "reversed", title: {text: "token"}};
      return Plotly.react(el, s.names.map((name, k) => ({type: "bar", orientation: "h", x: s.p[k], y: s.tokens,
        xaxis: `x${axis(k)}`, yaxis: "y", showlegend: false, customdata: s.p[k].map(num),
        marker: {color: s.tokens.map((_, j) => (j === s.drawn ? PINK : BLUE))},
        hovertemplate: `<b>%{y}</b><br>${name}: p = %{customdata}<extra></extra>`})), layout, CONFIG);
    },
  };

  // -- Apache ECharts (canvas) -------------------------------------------------------------------------
  const chartOf = (el, view) => echarts.getInstanceByDom(el) ||
    echarts.init(el, null, {renderer: "canvas", width: WIDTH, height: HEIGHT[view]});
  const axisName = (name, gap) => ({name, nameLocation: "middle", nameGap: gap});
  // The selected cells outlined: a mark area from cell (x0, y0) to cell (x1, y1), on an empty bar series, which
  // (unlike a heatmap) puts a mark area's ends at the cells' edges
  const frame = (x0, x1, y0, y1) => ({type: "bar", data: [], markArea: {silent: true, z: 10, itemStyle: {
    color: "transparent", borderColor: SELECTED, borderWidth: 2.5}, data: [[{xAxis: x0, yAxis: y0}, {xAxis: x1, yAxis: y1}]]}});
  const echartsGlue = {
    clear: (el) => echarts.getInstanceByDom(el)?.dispose(),
    attention(el, d, position) {
      const a = attention(d, position), cells = [];
      a.z.forEach((row, r) => row.forEach((p, k) => { if (p !== null) cells.push([k, r, p]); }));
      chartOf(el, "attention").setOption({animation: false, textStyle: {fontSize: 11},
        title: {text: `Layer ${LAYER + 1}, average over heads`, left: "center", textStyle: {fontSize: 12}},
        grid: {left: 110, right: 110, top: 30, bottom: 110, show: true, backgroundColor: MASKED, borderWidth: 0},
        tooltip: {formatter: ({value: [k, r, p]}) => `reply token ${a.rows[r]}<br>looks at ${a.keys[k]}<br>p = ${p.toFixed(4)}`},
        xAxis: {type: "category", data: a.keys, axisLabel: {rotate: 90, fontSize: 10}, ...axisName("key token (what was looked at)", 95)},
        yAxis: {type: "category", data: a.rows, inverse: true, axisLabel: {fontSize: 10}, ...axisName("reply token (being chosen)", 95)},
        visualMap: {type: "continuous", min: 0, max: a.zmax, right: 10, top: "middle", itemHeight: 300, itemWidth: 12,
          text: ["attention\nprobability", "0"], textStyle: {lineHeight: 14}, inRange: {color: ATTENTION}},
        series: [{type: "heatmap", data: cells, progressive: 0}, frame(0, a.keys.length - 1, a.selected, a.selected)]});
    },
    lens(el, d, position, first) {
      const [start, end] = lensWindow(position, d.tokens.length).map((v) => v + 0.5), chart = chartOf(el, "lens");
      const column = frame(position - 1, position - 1, 0, d.lens.layers.length - 1);
      if (!first) return chart.setOption({dataZoom: [{startValue: start - 1, endValue: end - 2}], series: [{}, column]});
      const g = lens(d), cells = [];
      g.z.forEach((row, l) => row.forEach((p, c) => cells.push([c, l, p])));
      chart.setOption({animation: false, textStyle: {fontSize: 11}, grid: {left: 80, right: 110, top: 10, bottom: 60},
        tooltip: {formatter: ({value: [c, l]}) => g.hover(l, c)},
        xAxis: {type: "category", data: g.labels, axisLabel: {interval: 0}, ...axisName("reply token (the column predicts it)", 35)},
        yAxis: {type: "category", data: g.layers, ...axisName("layer read out", 65)},
        dataZoom: [{type: "inside", xAxisIndex: 0, startValue: start - 1, endValue: end - 2, zoomLock: false}],
        visualMap: {type: "continuous", min: 0, max: 1, right: 10, top: "middle", itemHeight: 260, itemWidth: 12,
          text: ["p(token that\ncame next)", "0"], textStyle: {lineHeight: 14}, inRange: {color: VIRIDIS}},
        series: [{type: "heatmap", data: cells, progressive: 0,
          label: {show: true, fontSize: 9, formatter: ({value: [c, l]}) => g.top1[l][c]}}, column]});
    },
    sampling(el, d, position) {
      const s = stages(d, position), n = s.names.length, left = 80, width = (WIDTH - left - 10) / n;
      chartOf(el, "sampling").setOption({animation: false, textStyle: {fontSize: 11}, tooltip: {},
        title: s.names.map((name, k) => ({text: `{b|${name}}\n${s.left[k]}`, left: left + width * (k + 0.5),
          textAlign: "center", top: 8, textStyle: {fontSize: 11, fontWeight: "normal", lineHeight: 14,
            rich: {b: {fontWeight: "bold", lineHeight: 14}}}})),
        grid: s.names.map((_, k) => ({left: left + width * k + 4, width: width - 8, top: 45, bottom: 40})),
        xAxis: s.names.map((_, k) => ({gridIndex: k, min: 0, max: 1, interval: 0.5, ...axisName("p", 22)})),
        yAxis: s.names.map((_, k) => ({gridIndex: k, type: "category", data: s.tokens, inverse: true,
          axisLabel: {show: k === 0}, ...(k === 0 ? axisName("token", 65) : {})})),
        series: s.names.map((name, k) => ({type: "bar", xAxisIndex: k, yAxisIndex: k, barCategoryGap: "15%",
          tooltip: {formatter: ({name: token, value}) => `<b>${token}</b><br>${name}: p = ${num(value)}`},
          data: s.p[k].map((value, j) => ({value, itemStyle: {color: j === s.drawn ? PINK : BLUE}}))}))});
    },
  };

  // -- Vega-Lite, through vega-embed (canvas) ----------------------------------------------------------
  const VEGA = {$schema: "https://vega.github.io/schema/vega-lite/v6.json", config: {font: "sans-serif"}};
  async function embed(el, spec) {
    el.__view?.finalize();
    el.__view = (await vegaEmbed(el, {...VEGA, ...spec}, {actions: false, renderer: "canvas"})).view;
  }
  const attentionCells = (a) => a.z.flatMap((row, r) => row.flatMap((p, k) => (p === null ? [] :
    [{row: a.rows[r], key: a.keys[k], r: a.r0 + r, k: a.k0 + k, p}])));
  const lensSelected = (position, layers) => [{x0: position - 0.5, x1: position + 0.5, layer: layers[0]}];
  const samplingRows = (s) => s.names.flatMap((name, k) => s.tokens.map((token, j) => ({stage: `${name}: ${s.left[k]}`,
    token, rank: j, p: s.p[k][j], drawn: j === s.drawn})));
  const vegaLite = {
    clear: (el) => { el.__view?.finalize(); el.__view = null; el.innerHTML = ""; },
    async attention(el, d, position, first) {
      const a = attention(d, position), row = [{row: a.rows[a.selected], r: a.r0 + a.selected}];
      if (!first) return el.__view.data("cells", attentionCells(a)).data("row", row).signal("zmax", a.zmax).runAsync();
      // ordered by position: the order of first appearance would keep an earlier window's tokens first
      const y = {field: "row", type: "ordinal", sort: {field: "r", op: "min"}, title: "reply token (being chosen)"};
      await embed(el, {width: WIDTH - 190, height: HEIGHT.attention - 150, background: "white",
        title: {text: `Layer ${LAYER + 1}, average over heads`, fontSize: 12}, config: {view: {fill: MASKED}},
        datasets: {cells: attentionCells(a), row}, params: [{name: "zmax", value: a.zmax}],
        layer: [{data: {name: "cells"}, mark: "rect", encoding: {y,
          x: {field: "key", type: "ordinal", sort: {field: "k", op: "min"}, title: "key token (what was looked at)",
            axis: {labelAngle: -90}},
          color: {field: "p", type: "quantitative", scale: {domain: [0, {expr: "zmax / 10"}, {expr: "zmax"}], range: ATTENTION},
            legend: {title: "attention probability"}},
          tooltip: [{field: "row", title: "reply token"}, {field: "key", title: "looks at"}, {field: "p", format: ".4f"}]}},
        {data: {name: "row"}, mark: {type: "rect", fill: null, stroke: SELECTED, strokeWidth: 2.5}, encoding: {y}}]});
    },
    async lens(el, d, position, first) {
      const [lo, hi] = lensWindow(position, d.tokens.length), layers = d.lens.layers;
      if (!first) {
        el.__view.signal("grid_x0", [lo, hi]).data("selected", lensSelected(position, layers));
        return el.__view.runAsync();
      }
      const g = lens(d), cells = g.z.flatMap((row, l) => row.map((p, c) => ({x0: c + 0.5, x1: c + 1.5, x: c + 1,
        layer: g.layers[l], p, top1: g.top1[l][c], hover: g.hover(l, c).replace(/<br>/g, "; ")})));
      const x = {field: "x0", type: "quantitative", title: "reply token (the column predicts it)",
        scale: {domain: [lo, hi], nice: false, zero: false}, axis: {tickMinStep: 1, labelExpr: `${JSON.stringify(g.labels)}[datum.value - 1]`}};
      const y = {field: "layer", type: "ordinal", sort: g.layers.slice().reverse(), title: "layer read out"};
      await embed(el, {width: WIDTH - 170, height: HEIGHT.lens - 70, datasets: {cells, selected: lensSelected(position, layers)},
        layer: [{data: {name: "cells"}, mark: {type: "rect", clip: true}, params: [{name: "grid",
          select: {type: "interval", encodings: ["x"]}, bind: "scales"}],
          encoding: {x, x2: {field: "x1"}, y, color: {field: "p", type: "quantitative", scale: {scheme: "viridis", domain: [0, 1]},
            legend: {title: "p(token that came next)"}}, tooltip: {field: "hover"}}},
        {data: {name: "cells"}, mark: {type: "text", fontSize: 9, clip: true, color: "white"},
          encoding: {x: {field: "x", type: "quantitative"}, y, text: {field: "top1"}}},
        {data: {name: "selected"}, mark: {type: "rect", fill: null, stroke: SELECTED, strokeWidth: 2.5, clip: true},
          encoding: {x: {field: "x0", type: "quantitative"}, x2: {field: "x1"}}}]});
    },
    async sampling(el, d, position, first) {
      const s = stages(d, position);
      if (!first) return el.__view.data("bars", samplingRows(s)).runAsync();
      await embed(el, {datasets: {bars: samplingRows(s)}, data: {name: "bars"}, columns: s.names.length,
        facet: {field: "stage", type: "nominal", sort: [...new Set(samplingRows(s).map((r) => r.stage))],
          header: {title: null, labelFontWeight: "bold",
          labelExpr: "split(datum.value, ': ')"}},
        spec: {width: (WIDTH - 80) / s.names.length - 20, height: HEIGHT.sampling - 100, mark: "bar",
          encoding: {y: {field: "token", type: "nominal", sort: {field: "rank", op: "min"}, title: "token"},
            x: {field: "p", type: "quantitative", scale: {domain: [0, 1]}, axis: {values: [0, 0.5, 1]}},
            color: {condition: {test: "datum.drawn", value: PINK}, value: BLUE},
            tooltip: [{field: "token"}, {field: "stage"}, {field: "p", format: ".4f"}]}},
        resolve: {axis: {y: "shared"}}});
    },
  };

  window.chartBench = {libraries: {plotly, echarts: echartsGlue, "vega-lite": vegaLite},
    load(payload) { app.state.data = app.unpackAll(JSON.parse(payload)); return app.state.data.tokens.length; },
    // ms from the call to the next painted frame: a first draw into an emptied element, or a redraw
    async timed(library, view, position, first) {
      const glue = window.chartBench.libraries[library], el = document.getElementById(`${library}-${view}`);
      if (first) glue.clear(el);
      const start = performance.now();
      await glue[view](el, app.state.data, position, first);
      await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
      return performance.now() - start;
    }};
})();
