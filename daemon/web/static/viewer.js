// The result page's image viewer: plain JavaScript, no build, no library.
//
// The server sends each slice once as modality values (HU for CT); windowing,
// zoom, pan and slice changes happen here, from slices kept in memory and
// fetched ahead (the key image's neighbours first). A click on the image
// places the correction marker of the finding whose "Correct the location"
// is chosen; it records nothing: signing is the sign page's Sign button.
// Without JavaScript the page shows a server-rendered picture instead.
"use strict";

(function () {
  document.documentElement.classList.add("js");

  // Enter in a text field never submits a decision (the forms' disabled
  // default button already stops it; this keeps it so for any browser).
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (e.key === "Enter" && t instanceof HTMLInputElement && t.form &&
        (t.form.id === "decide" || t.form.id === "amend")) {
      e.preventDefault();
    }
  }, true);

  const host = document.getElementById("viewer");
  if (!host) return;
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const off = document.createElement("canvas");
  const offctx = off.getContext("2d");
  const slider = document.getElementById("slice-slider");
  const label = document.getElementById("slice-label");
  const wlLabel = document.getElementById("wl-label");
  const hint = document.getElementById("viewer-hint");
  document.getElementById("toolbar").hidden = false;
  hint.hidden = false;

  const state = {
    meta: null, k: 0, center: 40, width: 400, preset: null, zoom: 1, panX: 0, panY: 0,
    box: true, overlay: false, slices: [], saliency: [], loaded: 0, markers: new Map(),
  };
  const stats = { changes: [] };  // ms per slice change drawn from memory
  // For the browser tests: the state, the timings, and the rendered grey of each pixel.
  window.secondreaderViewer = {
    state, stats, show: (k) => show(k),
    rendered: () => {
      const rgba = offctx.getImageData(0, 0, off.width, off.height).data;
      return Array.from({ length: rgba.length / 4 }, (_, i) => rgba[4 * i]);
    },
  };

  const HOT = [];  // "inferno"-like ramp for the saliency overlay
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    HOT.push([Math.min(255, 40 + 600 * t), Math.max(0, Math.min(255, 420 * (t - 0.35))),
              Math.max(0, Math.min(255, 600 * (t - 0.75)) + 60 * (1 - t))]);
  }

  fetch(host.dataset.json, { credentials: "same-origin" })
    .then((r) => r.json())
    .then((meta) => {
      state.meta = meta;
      state.k = meta.key;
      slider.max = String(meta.slices);
      buildPresets(meta.presets);
      choosePreset(meta.default);
      resize();
      prefetch();
      updateLabels();
    });

  function buildPresets(presets) {
    const box = document.getElementById("presets");
    presets.forEach((p, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = p.name;
      b.title = `${p.name} (${i + 1})`;
      b.dataset.key = p.key;
      b.id = `preset-${p.key}`;
      b.addEventListener("click", () => { choosePreset(p.key); host.focus({ preventScroll: true }); });
      box.appendChild(b);
    });
  }

  function choosePreset(key) {
    const p = state.meta.presets.find((q) => q.key === key);
    if (!p) return;
    if (p.center === null) {
      const px = state.slices[state.k];
      if (!px) { state.pendingAuto = true; return; }
      const [lo, hi] = range(px.data);
      state.center = (lo + hi) / 2;
      state.width = Math.max(hi - lo, 1);
    } else {
      state.center = p.center;
      state.width = p.width;
    }
    state.preset = key;
    document.querySelectorAll("#presets button").forEach((b) =>
      b.setAttribute("aria-pressed", String(b.dataset.key === key)));
    draw();
  }

  function range(data) {
    const step = Math.max(1, Math.floor(data.length / 20000));
    const sample = [];
    for (let i = 0; i < data.length; i += step) sample.push(data[i]);
    sample.sort((a, b) => a - b);
    return [sample[Math.floor(sample.length * 0.01)], sample[Math.floor(sample.length * 0.99)]];
  }

  // -- fetching ---------------------------------------------------------------
  function prefetch() {
    const n = state.meta.slices;
    const order = [];
    for (let d = 0; d < n; d++) {
      for (const k of d === 0 ? [state.k] : [state.k + d, state.k - d]) {
        if (k >= 0 && k < n) order.push(k);
      }
    }
    let next = 0;
    const worker = () => {
      if (next >= order.length) return Promise.resolve();
      const k = order[next++];
      return load(k).then(worker);
    };
    for (let i = 0; i < 6; i++) worker();
  }

  function load(k) {
    if (state.slices[k]) return Promise.resolve(state.slices[k]);
    const url = state.meta.slice_url.replace("{k}", String(k));
    return fetch(url, { credentials: "same-origin" }).then((r) => {
      const rows = Number(r.headers.get("X-Rows"));
      const cols = Number(r.headers.get("X-Columns"));
      const float = r.headers.get("X-Dtype") === "float32";
      return r.arrayBuffer().then((buf) => {
        const data = float ? new Float32Array(buf) : new Int16Array(buf);
        state.slices[k] = { rows, cols, data };
        state.loaded++;
        if (k === state.k) {
          if (state.pendingAuto) { state.pendingAuto = false; choosePreset("auto"); }
          draw();
        }
        return state.slices[k];
      });
    });
  }

  function loadSaliency(k) {
    if (!state.meta.saliency.includes(k) || state.saliency[k] !== undefined) return;
    state.saliency[k] = null;
    const url = state.meta.saliency_url.replace("{k}", String(k));
    fetch(url, { credentials: "same-origin" }).then((r) => r.ok ? r.arrayBuffer() : null)
      .then((buf) => { if (buf) { state.saliency[k] = new Uint8Array(buf); if (k === state.k) draw(); } });
  }

  // -- drawing ----------------------------------------------------------------
  function resize() {
    const ratio = window.devicePixelRatio || 1;
    const w = Math.round(host.clientWidth * ratio), h = Math.round(host.clientHeight * ratio);
    if (w === canvas.width && h === canvas.height) return;
    canvas.width = w;
    canvas.height = h;
    draw();
  }
  // The pane changes size with the window, and when a scroll bar comes or goes.
  new ResizeObserver(() => resize()).observe(host);

  function geometry(px) {
    const fit = Math.min(canvas.width / px.cols, canvas.height / px.rows);
    const s = fit * state.zoom;
    const ratio = window.devicePixelRatio || 1;
    return {
      s,
      x: (canvas.width - px.cols * s) / 2 + state.panX * ratio,
      y: (canvas.height - px.rows * s) / 2 + state.panY * ratio,
    };
  }

  function draw() {
    if (!state.meta) return false;
    const px = state.slices[state.k];
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!px) {
      ctx.fillStyle = "#888";
      ctx.font = "16px sans-serif";
      ctx.fillText("loading image " + (state.k + 1) + " …", 20, 30);
      return false;
    }
    if (off.width !== px.cols || off.height !== px.rows) {
      off.width = px.cols;
      off.height = px.rows;
    }
    const image = offctx.createImageData(px.cols, px.rows);
    const out = new Uint32Array(image.data.buffer);
    const lo = state.center - state.width / 2;
    const scale = 255 / state.width;
    const sal = state.overlay ? state.saliency[state.k] : null;
    const data = px.data;
    for (let i = 0; i < data.length; i++) {
      let v = (data[i] - lo) * scale;
      v = v < 0 ? 0 : v > 255 ? 255 : v | 0;
      const h = sal ? sal[i] : 0;
      if (h) {
        const a = (h / 255) * 0.45;
        const c = HOT[h];
        const r = v * (1 - a) + c[0] * a, g = v * (1 - a) + c[1] * a, b = v * (1 - a) + c[2] * a;
        out[i] = 0xff000000 | (b << 16) | (g << 8) | r;
      } else {
        out[i] = 0xff000000 | (v << 16) | (v << 8) | v;
      }
    }
    offctx.putImageData(image, 0, 0);
    const g = geometry(px);
    ctx.imageSmoothingEnabled = g.s < 2;
    ctx.drawImage(off, g.x, g.y, px.cols * g.s, px.rows * g.s);
    vectors(g);
    return true;
  }

  function vectors(g) {
    const ratio = window.devicePixelRatio || 1;
    ctx.lineWidth = 2 * ratio;
    ctx.font = `${13 * ratio}px sans-serif`;
    if (state.box) {
      for (const f of state.meta.findings) {
        if (f.slice !== state.k || !f.box || !f.present) continue;
        const [c0, r0, c1, r1] = f.box;
        ctx.strokeStyle = "#ffdc00";
        ctx.strokeRect(g.x + c0 * g.s - 2, g.y + r0 * g.s - 2, (c1 - c0) * g.s + 4, (r1 - r0) * g.s + 4);
        ctx.fillStyle = "#ffdc00";
        ctx.fillText(`AI ${f.number}: ${f.finding}`, g.x + c0 * g.s, g.y + r0 * g.s - 6 * ratio);
      }
    }
    for (const d of state.meta.decisions) {  // earlier decisions with a location
      if (d.slice !== state.k || !d.point) continue;
      cross(g, d.point[0], d.point[1], "#59c48a", `${d.number}: ${d.decision} by ${d.reviewer}`);
    }
    for (const [set, m] of state.markers) {
      if (m.k !== state.k) continue;
      cross(g, m.col, m.row, "#00e5ff", `correction ${set.closest("[data-number]").dataset.number}`);
    }
  }

  function cross(g, col, row, colour, text) {
    const ratio = window.devicePixelRatio || 1;
    const x = g.x + (col + 0.5) * g.s, y = g.y + (row + 0.5) * g.s, r = 9 * ratio;
    ctx.strokeStyle = colour;
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.moveTo(x - 2 * r, y); ctx.lineTo(x - r / 2, y);
    ctx.moveTo(x + r / 2, y); ctx.lineTo(x + 2 * r, y);
    ctx.moveTo(x, y - 2 * r); ctx.lineTo(x, y - r / 2);
    ctx.moveTo(x, y + r / 2); ctx.lineTo(x, y + 2 * r);
    ctx.stroke();
    ctx.fillStyle = colour;
    ctx.fillText(text, x + 2 * r, y - r);
  }

  function updateLabels() {
    if (!state.meta) return;
    label.textContent = `${state.k + 1} / ${state.meta.slices}`;
    slider.value = String(state.k + 1);
    host.setAttribute("aria-label", `image ${state.k + 1} of ${state.meta.slices}`);
    host.dataset.slice = String(state.k);
    wlLabel.textContent = `W ${Math.round(state.width)} / L ${Math.round(state.center)}` +
      (state.zoom !== 1 ? ` · ${Math.round(state.zoom * 100)} %` : "");
  }

  function show(k) {
    if (!state.meta) return;
    const t0 = performance.now();
    state.k = Math.max(0, Math.min(state.meta.slices - 1, k));
    if (state.overlay) loadSaliency(state.k);
    const drawn = draw();
    updateLabels();
    if (drawn) stats.changes.push(performance.now() - t0);
    else load(state.k);
  }

  // -- input --------------------------------------------------------------------
  slider.addEventListener("input", () => show(Number(slider.value) - 1));
  host.addEventListener("wheel", (e) => {
    e.preventDefault();
    if (e.ctrlKey) { zoom(e.deltaY < 0 ? 1.25 : 0.8); return; }
    show(state.k + (e.deltaY > 0 ? 1 : -1));
  }, { passive: false });

  function zoom(f) {
    state.zoom = Math.max(0.25, Math.min(16, state.zoom * f));
    draw();
    updateLabels();
  }
  document.getElementById("zoom-in").addEventListener("click", () => zoom(1.25));
  document.getElementById("zoom-out").addEventListener("click", () => zoom(0.8));
  document.getElementById("zoom-reset").addEventListener("click", () => {
    state.zoom = 1; state.panX = 0; state.panY = 0; draw(); updateLabels();
  });
  const boxButton = document.getElementById("toggle-box");
  const overlayButton = document.getElementById("toggle-overlay");
  function toggleBox() {
    state.box = !state.box;
    boxButton.setAttribute("aria-pressed", String(state.box));
    draw();
  }
  function toggleOverlay() {
    state.overlay = !state.overlay;
    overlayButton.setAttribute("aria-pressed", String(state.overlay));
    if (state.overlay) loadSaliency(state.k);
    draw();
  }
  boxButton.addEventListener("click", toggleBox);
  overlayButton.addEventListener("click", toggleOverlay);

  function choose(decision) {
    const first = document.querySelector("#decide fieldset.choose");
    const radio = first && first.querySelector(`input[value="${decision}"]`);
    if (radio) radio.checked = true;
  }

  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement && t.type !== "radio" && t.type !== "range" ||
        t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const keys = {
      ArrowDown: () => show(state.k + 1), ArrowRight: () => show(state.k + 1), j: () => show(state.k + 1),
      ArrowUp: () => show(state.k - 1), ArrowLeft: () => show(state.k - 1), k: () => show(state.k - 1),
      Home: () => show(0), End: () => show(state.meta.slices - 1),
      b: toggleBox, o: toggleOverlay, "+": () => zoom(1.25), "=": () => zoom(1.25), "-": () => zoom(0.8),
      0: () => { state.zoom = 1; state.panX = 0; state.panY = 0; draw(); updateLabels(); },
      c: () => choose("confirm"), r: () => choose("reject"), x: () => choose("correct"),
      n: () => { window.location.href = document.getElementById("next-case").href; },
    };
    let act = keys[e.key];
    if (!act && /^[1-9]$/.test(e.key) && state.meta) {
      const p = state.meta.presets[Number(e.key) - 1];
      if (p) act = () => choosePreset(p.key);
    }
    if (act && state.meta) { e.preventDefault(); act(); }
  });

  // Drag: window/level; shift-drag: pan; a click (no drag): the marker.
  let drag = null;
  canvas.addEventListener("pointerdown", (e) => {
    host.focus({ preventScroll: true });
    canvas.setPointerCapture(e.pointerId);
    drag = { x: e.clientX, y: e.clientY, moved: false, center: state.center, width: state.width,
             panX: state.panX, panY: state.panY, marker: markerAt(e), shift: e.shiftKey };
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 4) return;
    drag.moved = true;
    if (drag.marker) {
      place(drag.marker, e);
    } else if (drag.shift) {
      state.panX = drag.panX + dx; state.panY = drag.panY + dy; draw();
    } else {
      state.width = Math.max(1, drag.width * Math.exp(dx / 200));
      state.center = drag.center - dy * drag.width / 400;
      state.preset = null;
      document.querySelectorAll("#presets button").forEach((b) => b.setAttribute("aria-pressed", "false"));
      draw();
      updateLabels();
    }
  });
  canvas.addEventListener("pointerup", (e) => {
    if (drag && !drag.moved) {
      const set = correcting();
      if (set) place(set, e);
      else hint.textContent = "To correct a location, choose \u201cCorrect the location\u201d for the finding, then click where it is.";
    }
    drag = null;
  });

  function correcting() {
    const chosen = document.querySelector("#decide input.correct:checked, #amend input.correct:checked");
    if (chosen) return chosen.closest("fieldset");
    const sets = document.querySelectorAll("#decide fieldset.choose");
    if (sets.length === 1) {  // one finding: a click means correcting it
      sets[0].querySelector("input.correct").checked = true;
      return sets[0];
    }
    return null;
  }

  function toImage(e) {
    const px = state.slices[state.k];
    if (!px) return null;
    const g = geometry(px);
    const rect = canvas.getBoundingClientRect();
    const col = ((e.clientX - rect.left) * (canvas.width / rect.width) - g.x) / g.s - 0.5;
    const row = ((e.clientY - rect.top) * (canvas.height / rect.height) - g.y) / g.s - 0.5;
    if (col < 0 || row < 0 || col > px.cols - 1 || row > px.rows - 1) return null;
    return { col: Math.round(col * 10) / 10, row: Math.round(row * 10) / 10 };
  }

  function markerAt(e) {
    const at = toImage(e);
    const px = state.slices[state.k];
    if (!at || !px) return null;
    const g = geometry(px);
    for (const [set, m] of state.markers) {
      const dist = Math.hypot(m.col - at.col, m.row - at.row) * g.s;
      if (m.k === state.k && dist < 14 * (window.devicePixelRatio || 1)) return set;
    }
    return null;
  }

  function place(set, e) {
    const at = toImage(e);
    if (!at) return;
    state.markers.set(set, { k: state.k, col: at.col, row: at.row });
    set.querySelector(".marker-slice").value = state.meta.uids[state.k];
    set.querySelector(".marker-col").value = String(at.col);
    set.querySelector(".marker-row").value = String(at.row);
    set.querySelector(".marker-readout").textContent =
      `Marker on image ${state.k + 1}: column ${at.col.toFixed(0)}, row ${at.row.toFixed(0)}. ` +
      "Drag it, or click elsewhere, to move it. Nothing is signed yet.";
    draw();
  }
})();
