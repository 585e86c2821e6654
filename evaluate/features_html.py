"""The feature browser's page: one self-contained HTML file (inline CSS and script, the data as embedded JSON,
no network), so it opens from a laptop's disk. The script renders the index of latents (sortable, searchable by
token) and, for the latent in the URL's #fragment (#123), its statistics, activation histogram, logit lens and
top contexts, each token shaded by the latent's activation with the value on hover.
"""

from __future__ import annotations

import html
import json

CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; background: #f6f7f9; }
header { padding: 10px 18px; background: #24292f; color: #fff; }
header h1 { margin: 0; font-size: 17px; font-weight: 600; }
header .meta { font-size: 12.5px; color: #c9d1d9; margin-top: 2px; }
main { display: flex; height: calc(100vh - 58px); }
aside { width: 390px; flex: none; border-right: 1px solid #d0d7de; background: #fff; display: flex; flex-direction: column; }
aside .tools { padding: 8px 10px; border-bottom: 1px solid #d0d7de; }
aside input[type=search] { width: 100%; padding: 6px 8px; border: 1px solid #d0d7de; border-radius: 6px; font-size: 13px; }
aside .tools label { font-size: 12px; color: #57606a; margin-right: 10px; }
aside .list { overflow: auto; flex: 1; }
table.index { border-collapse: collapse; width: 100%; font-size: 12.5px; table-layout: fixed; }
table.index th:nth-child(1) { width: 88px; } table.index th:nth-child(2) { width: 68px; } table.index th:nth-child(3) { width: 80px; }
table.index th { position: sticky; top: 0; background: #f6f8fa; text-align: left; padding: 5px 6px; cursor: pointer;
  border-bottom: 1px solid #d0d7de; white-space: nowrap; user-select: none; }
table.index td { padding: 3px 6px; border-bottom: 1px solid #eaeef2; white-space: nowrap; }
table.index td.toks { overflow: hidden; text-overflow: ellipsis; font-family: ui-monospace, monospace; }
table.index tr { cursor: pointer; }
table.index tr:hover { background: #f3f4f6; }
table.index tr.sel { background: #ddf4ff; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; font-size: 10.5px; padding: 0 5px; border-radius: 8px; margin-left: 4px; font-weight: 600; }
.badge.dead { background: #eaeef2; color: #57606a; }
.badge.dense { background: #fff1e5; color: #bc4c00; }
.shown { font-size: 11.5px; color: #57606a; padding: 4px 10px; border-top: 1px solid #d0d7de; }
section#detail { flex: 1; overflow: auto; padding: 14px 20px; }
h2 { margin: 0 0 8px; font-size: 20px; }
h3 { margin: 16px 0 6px; font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: #57606a; }
.cards { display: flex; gap: 10px; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 6px 12px; min-width: 120px; }
.card .v { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .l { font-size: 11.5px; color: #57606a; }
.row2 { display: flex; gap: 22px; flex-wrap: wrap; align-items: flex-start; }
svg.hist { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; }
svg.hist text { font-size: 10.5px; fill: #57606a; }
.lens { display: flex; gap: 16px; }
.lens ol { margin: 0; padding: 0; list-style: none; min-width: 150px; }
.lens li { display: flex; justify-content: space-between; gap: 10px; padding: 1px 8px; border-radius: 4px; margin: 2px 0;
  font-family: ui-monospace, monospace; font-size: 12.5px; }
.lens .pos li { background: #dafbe1; }
.lens .neg li { background: #ffebe9; }
.lens .t { white-space: pre; }
.ctx { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 4px 8px; margin: 4px 0; display: flex; gap: 10px; }
.ctx .val { flex: none; width: 48px; text-align: right; font-variant-numeric: tabular-nums; color: #bc4c00; font-weight: 600;
  font-size: 12.5px; padding-top: 1px; }
.ctx .text { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; white-space: pre-wrap;
  word-break: break-all; }
.tok { border-radius: 2px; }
.tok.max { outline: 1.5px solid #bc4c00; }
.note { color: #57606a; font-size: 12.5px; }
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById('sae-data').textContent);
const L = D.latents, I = D.info, F = L.density.length;
const $ = (tag, attrs = {}, ...kids) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) (k === 'text' ? (e.textContent = v) : e.setAttribute(k, v));
  e.append(...kids); return e; };
const word = id => (D.vocab[id] ?? '<' + id + '>').replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5');
const fmt = v => v === 0 ? '0' : Math.abs(v) >= 1000 || Math.abs(v) < 0.01 ? v.toExponential(2) : String(v);
const pct = d => (100 * d).toPrecision(3) + '%';
const dead = i => L.fired[i] === 0, dense = i => L.density[i] > I.dense_frequency;
// the token at the highest activation of each top context, most frequent first: what the index shows and searches
const topTokens = L.contexts.map(cs => { const n = new Map();
  cs.forEach(c => { const w = word(c[3][c[2]]); n.set(w, (n.get(w) || 0) + 1); });
  return [...n.entries()].sort((a, b) => b[1] - a[1]).map(e => e[0]); });
const haystack = topTokens.map((ws, i) => ws.concat(L.lens_pos[i].map(p => word(p[0]))).join('\u0000').toLowerCase());
let sortKey = 'max', desc = true, selected = -1;
const LIMIT = 1000;  // rows drawn at once; search or sort to reach the others

function badges(i) { return [dead(i) ? $('span', {class: 'badge dead', text: 'dead'}) : '',
                             dense(i) ? $('span', {class: 'badge dense', text: 'dense'}) : ''].filter(Boolean); }

function renderIndex() {
  const q = document.getElementById('q').value.toLowerCase(), hide = document.getElementById('hide-dead').checked;
  let ids = [...Array(F).keys()].filter(i => (!q || haystack[i].includes(q)) && !(hide && dead(i)));
  const key = sortKey === 'id' ? (i => i) : (i => L[sortKey][i]);
  ids.sort((a, b) => (desc ? key(b) - key(a) : key(a) - key(b)) || a - b);
  const body = document.querySelector('table.index tbody');
  body.replaceChildren(...ids.slice(0, LIMIT).map(i => {
    const tr = $('tr', {'data-latent': i, class: i === selected ? 'sel' : ''},
      $('td', {class: 'num'}, String(i), ...badges(i)), $('td', {class: 'num', text: pct(L.density[i])}),
      $('td', {class: 'num', text: fmt(L.max[i])}), $('td', {class: 'toks', text: topTokens[i].slice(0, 4).join(' \u00b7 ')}));
    tr.onclick = () => { location.hash = i; }; return tr; }));
  document.getElementById('shown').textContent = ids.length > LIMIT ? `showing ${LIMIT} of ${ids.length} matching latents`
    : `${ids.length} of ${F} latents`;
  document.querySelectorAll('table.index th[data-key]').forEach(th => th.dataset.key === sortKey
    ? th.setAttribute('data-dir', desc ? '\u25bc' : '\u25b2') : th.removeAttribute('data-dir'));
}

function histogram(i) {
  const h = L.hist[i], W = 360, H = 150, pad = 18, top = Math.max(...h, 1), bw = (W - 2 * pad) / h.length;
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('class', 'hist'); svg.setAttribute('width', W); svg.setAttribute('height', H + 22);
  const add = (tag, a, text) => { const e = document.createElementNS(svg.namespaceURI, tag);
    for (const k in a) e.setAttribute(k, a[k]); if (text !== undefined) e.textContent = text; svg.append(e); return e; };
  const range = L.hist_range[i];
  h.forEach((c, b) => { if (!c) return; const y = (H - 10) * c / top;
    add('rect', {x: pad + b * bw + 0.5, y: H - y, width: Math.max(bw - 1, 1), height: y, fill: '#fb8f44'})
      .append(Object.assign(document.createElementNS(svg.namespaceURI, 'title'),
        {textContent: `${fmt(range * b / h.length)} to ${fmt(range * (b + 1) / h.length)}: ${c} tokens`})); });
  add('line', {x1: pad, x2: W - pad, y1: H, y2: H, stroke: '#8c959f'});
  for (const f of [0, 0.5, 1]) add('text', {x: pad + f * (W - 2 * pad), y: H + 14, 'text-anchor': 'middle'}, fmt(range * f));
  add('text', {x: W - pad, y: 12, 'text-anchor': 'end'}, `active tokens per bin (max bin ${top})`);
  return svg;
}

function contextLine(c, scale) {
  const [value, row, at, ids, acts] = c;
  const text = $('div', {class: 'text'}, ...ids.map((t, j) => {
    const a = acts[j], alpha = scale > 0 ? Math.min(a / scale, 1) : 0;
    return $('span', {class: 'tok' + (j === at ? ' max' : ''), title: `${word(t)} \u2192 ${fmt(a)}`,
                      'data-act': a, style: a > 0 ? `background: rgba(251, 143, 68, ${alpha.toFixed(3)})` : ''}, word(t)); }));
  return $('div', {class: 'ctx', title: `cache row ${row}`}, $('div', {class: 'val', text: fmt(value)}), text);
}

function lensList(cls, pairs) {
  return $('ol', {class: cls}, ...pairs.map(([t, v]) => $('li', {class: 'lens-tok'}, $('span', {class: 't', text: word(t)}),
                                                        $('span', {class: 'num', text: (v > 0 ? '+' : '') + fmt(v)}))));
}

function renderLatent(i) {
  selected = i;
  const card = (v, l) => $('div', {class: 'card'}, $('div', {class: 'v', text: v}), $('div', {class: 'l', text: l}));
  const lens = I.lens_note ? $('p', {class: 'note', text: I.lens_note}) : $('div', {class: 'lens'},
    $('div', {}, $('div', {class: 'note', text: 'promotes'}), lensList('pos', L.lens_pos[i])),
    $('div', {}, $('div', {class: 'note', text: 'suppresses'}), lensList('neg', L.lens_neg[i])));
  const ctxs = L.contexts[i];
  document.getElementById('detail').replaceChildren(
    $('h2', {}, `Latent ${i}`, ...badges(i)),
    $('div', {class: 'cards'}, card(pct(L.density[i]), `density (${L.fired[i].toLocaleString()} of ${I.tokens.toLocaleString()} tokens)`),
      card(fmt(L.mean[i]), 'mean activation when active'), card(fmt(L.max[i]), 'max activation')),
    $('div', {class: 'row2'}, $('div', {}, $('h3', {text: 'Activation histogram'}), histogram(i)),
      $('div', {}, $('h3', {text: 'Logit lens (decoder direction \u00b7 W_U)'}), lens)),
    $('h3', {text: `Top ${ctxs.length} held-out contexts (highest activation per context, ${I.window_before} tokens before it)`}),
    ...(ctxs.length ? ctxs.map(c => contextLine(c, L.max[i])) : [$('p', {class: 'note', text: 'never active on the scanned tokens'})]));
  document.querySelectorAll('table.index tr.sel').forEach(tr => tr.classList.remove('sel'));
  const tr = document.querySelector(`table.index tr[data-latent="${i}"]`); if (tr) tr.classList.add('sel');
}

function fromHash() {
  const i = parseInt(location.hash.slice(1), 10);
  renderLatent(Number.isInteger(i) && i >= 0 && i < F ? i : [...Array(F).keys()].sort((a, b) => L.max[b] - L.max[a])[0]);
}
document.querySelectorAll('table.index th[data-key]').forEach(th => th.onclick = () => {
  desc = th.dataset.key === sortKey ? !desc : th.dataset.key !== 'id'; sortKey = th.dataset.key; renderIndex(); });
document.getElementById('q').oninput = renderIndex;
document.getElementById('hide-dead').onchange = renderIndex;
window.onhashchange = fromHash;
renderIndex(); fromHash();
"""

BODY = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{css}
table.index th[data-dir]::after {{ content: " " attr(data-dir); }}</style></head>
<body><header><h1>{title}</h1><div class="meta">{meta}</div></header>
<main><aside><div class="tools"><input type="search" id="q" placeholder="search latents by token (top contexts, promoted)">
<div><label><input type="checkbox" id="hide-dead"> hide dead</label><span class="note">click a column to sort</span></div></div>
<div class="list"><table class="index"><thead><tr><th data-key="id">latent</th><th data-key="density">density</th>
<th data-key="max">max act</th><th>top tokens</th></tr></thead><tbody></tbody></table></div>
<div class="shown" id="shown"></div></aside>
<section id="detail"><p class="note">This page needs JavaScript to draw the latents.</p></section></main>
<script type="application/json" id="sae-data">{data}</script>
<script>{script}</script></body></html>
"""


def render_page(data: dict) -> str:
    """The page for one SAE's `data` (evaluate/features.py `page_data`)."""
    info, latents = data["info"], data["latents"]
    dead = sum(1 for n in latents["fired"] if n == 0)
    dense = sum(1 for d in latents["density"] if d > info["dense_frequency"])
    meta = (f"{info['arch']}, k={info['k']}, {info['d_sae']:,} latents on {info['hook']} of {info['model']} · "
            f"{info['tokens']:,} held-out tokens (cache rows {info['rows'][0][0]:,} to {info['rows'][-1][1]:,}, "
            f"{len(info['rows']):,} range(s)) · "
            f"{dead:,} dead, {dense:,} dense (active on more than {info['dense_frequency']:.0%} of tokens)")
    # JSON inside <script>: "<" escaped so that no token text can close the element
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return BODY.format(title=html.escape(f"sae features: {info['name']}"), meta=html.escape(meta), css=CSS,
                       data=payload, script=SCRIPT)
