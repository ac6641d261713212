"""The single-page web UI served at ``/`` (plain HTML + JS, no build step, no external assets)."""
# ruff: noqa: E501

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>noisewise</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; color: #222; }
  form { display: grid; grid-template-columns: 10rem 1fr; gap: .5rem 1rem; align-items: center; }
  input[type=text] { width: 100%; }
  .row { display: flex; gap: 2rem; margin-top: 1.5rem; }
  img.px { width: 256px; height: 256px; image-rendering: pixelated; border: 1px solid #ccc; background: #eee; }
  pre { background: #f6f6f6; padding: .5rem; font-size: .8rem; white-space: pre-wrap; }
  #error { color: #b00; }
  img.thumb { width: 32px; height: 32px; image-rendering: pixelated; vertical-align: middle; }
  img.thumb:not([src]) { display: none; }
  .hint { color: #666; font-size: .85rem; }
</style>
</head>
<body>
<h1>noisewise</h1>
<form id="form">
  <label for="prompt">Prompt</label><input type="text" id="prompt" value="a large red circle on the left">
  <label for="negative_prompt">Negative prompt</label><input type="text" id="negative_prompt" placeholder="model default">
  <label for="negative_scale">Negative scale</label>
  <span><input type="number" id="negative_scale" min="0" max="50" step="0.25" placeholder="model default">
    <span class="hint">its own weight; blank: the model's default</span></span>
  <label for="negative_above">Negative from noise</label>
  <span><input type="number" id="negative_above" min="0" max="1000" step="0.1" placeholder="model default">
    <span class="hint">with its own weight: acts only at noise levels &sigma;/&alpha; at or above this (0: every level)</span></span>
  <label for="negative_perpendicular">Negative across only</label>
  <span><select id="negative_perpendicular"><option value="">model default</option><option value="true">on</option>
    <option value="false">off</option></select>
    <span class="hint">with its own weight: subtract only the part perpendicular to the prompt's direction</span></span>
  <label for="model">Model</label><select id="model"></select>
  <label for="sampler">Sampler</label><select id="sampler"></select>
  <label for="steps">Steps</label><input type="number" id="steps" min="1" value="20">
  <label for="guidance_scale">Guidance</label><input type="number" id="guidance_scale" min="0" max="50" step="0.5" value="7.5">
  <label for="seed">Seed</label><input type="number" id="seed" min="0" value="0">
  <label for="init_image">Init image (optional)</label>
  <span><input type="file" id="init_image" accept="image/png,image/jpeg">
    <button type="button" id="clear_image" disabled>Remove</button>
    <img id="init_preview" class="thumb" alt=""> <span id="init_info" class="hint">image-to-image: a PNG or JPEG</span></span>
  <label for="resize">Resize</label>
  <span><select id="resize" disabled><option value="auto">auto</option><option value="crop">crop</option>
    <option value="stretch">stretch</option><option value="off">off</option></select>
    <span class="hint">to the model's size: auto scales a square picture, crop its centre square, stretch each side; off refuses</span></span>
  <label for="strength">Strength</label>
  <span><input type="range" id="strength" min="0.05" max="1" step="0.05" value="0.8" disabled>
    <output id="strength_value" for="strength">0.8</output> <span class="hint">1 ignores the image; small values keep it</span></span>
  <span></span><span><button type="submit" id="generate">Generate</button>
  <button type="button" id="cancel" disabled>Cancel</button></span>
</form>
<div class="row">
  <div><h3>Progress</h3><progress id="progress" value="0" max="1"></progress>
    <div id="status">idle</div><img id="preview" class="px" alt="step preview"></div>
  <div><h3>Result</h3><img id="result" class="px" alt="result"><pre id="params"></pre></div>
</div>
<div id="error"></div>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;
let initImage = null;  // base64 of the chosen file (no data: prefix), or null for text-to-image
function clearImage() {
  initImage = null; $('init_image').value = ''; $('init_preview').removeAttribute('src');
  $('init_info').textContent = 'image-to-image: a PNG or JPEG';
  $('strength').disabled = true; $('resize').disabled = true; $('clear_image').disabled = true;
}
function pickImage() {
  const f = $('init_image').files[0];
  if (!f) { clearImage(); return; }
  const reader = new FileReader();
  reader.onload = () => {
    const url = String(reader.result);
    initImage = url.slice(url.indexOf(',') + 1);
    $('init_preview').src = url;  // shows nothing for a file that is not a picture; the server says why
    $('init_info').textContent = `${f.name} (${f.size} bytes)`;
    $('strength').disabled = false; $('resize').disabled = false; $('clear_image').disabled = false;
  };
  reader.onerror = () => { clearImage(); $('error').textContent = 'cannot read the file: ' + reader.error; };
  reader.readAsDataURL(f);
}
function detail(j) {
  if (typeof j.detail === 'string') return j.detail;
  if (Array.isArray(j.detail)) return j.detail.map(e => `${(e.loc || []).filter(x => x !== 'body').join('.') || 'request'}: ${e.msg}`).join('; ');
  return JSON.stringify(j.detail);
}
async function fill() {
  const [m, s] = await Promise.all([fetch('/v1/models').then(r => r.json()), fetch('/v1/samplers').then(r => r.json())]);
  for (const x of m.models) $('model').add(new Option(x.name, x.name));
  for (const x of s.samplers) $('sampler').add(new Option(x.name + (x.stochastic ? ' (stochastic)' : ''), x.name));
  $('sampler').value = 'dpmpp_2m';
  document.body.dataset.ready = '1';
}
function request() {
  const neg = $('negative_prompt').value;
  const negScale = $('negative_scale').value;
  const negAbove = $('negative_above').value;
  const negPerp = $('negative_perpendicular').value;
  return { prompt: $('prompt').value, negative_prompt: neg === '' ? null : neg,
           negative_scale: negScale === '' ? null : parseFloat(negScale),
           negative_above: negAbove === '' ? null : parseFloat(negAbove),
           negative_perpendicular: negPerp === '' ? null : negPerp === 'true', model: $('model').value,
           sampler: $('sampler').value, steps: parseInt($('steps').value), seed: parseInt($('seed').value),
           guidance_scale: parseFloat($('guidance_scale').value),
           ...(initImage === null ? {} : { image: initImage, strength: parseFloat($('strength').value),
                                           resize: $('resize').value }) };
}
function onEvent(ev, steps) {
  if (ev.event === 'queued') { $('status').textContent = 'queued'; }
  else if (ev.event === 'started') { $('status').textContent = 'running'; }
  else if (ev.event === 'step') {
    $('progress').max = ev.steps || steps; $('progress').value = ev.step;
    $('status').textContent = `step ${ev.step} / ${ev.steps || steps}`;
    if (ev.preview) { $('preview').src = 'data:image/png;base64,' + ev.preview; $('preview').dataset.steps = ev.step; }
  } else if (ev.event === 'done') {
    const im = ev.images[0];
    $('result').src = 'data:image/png;base64,' + im.png_base64;
    $('params').textContent = JSON.stringify(im.metadata, null, 2);
    $('status').textContent = `done (${ev.nfe} network evaluations)`;
    $('progress').value = $('progress').max;
  } else if (ev.event === 'error') { $('error').textContent = `error ${ev.status}: ${ev.detail}`; $('status').textContent = 'failed'; }
}
async function generate(e) {
  e.preventDefault();
  $('error').textContent = ''; $('params').textContent = ''; $('result').removeAttribute('src');
  $('generate').disabled = true; $('cancel').disabled = false;
  const body = request();
  controller = new AbortController();
  try {
    const r = await fetch('/v1/generate/stream', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                                                   body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      $('error').textContent = `error ${r.status}: ${detail(j)}`; $('status').textContent = 'rejected'; return;
    }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let k;
      while ((k = buf.indexOf('\n\n')) >= 0) {
        const chunk = buf.slice(0, k); buf = buf.slice(k + 2);
        for (const line of chunk.split('\n')) if (line.startsWith('data: ')) onEvent(JSON.parse(line.slice(6)), body.steps);
      }
    }
  } catch (err) {
    if (err.name === 'AbortError') $('status').textContent = 'cancelled'; else $('error').textContent = String(err);
  } finally { $('generate').disabled = false; $('cancel').disabled = true; controller = null; }
}
$('form').addEventListener('submit', generate);
$('init_image').addEventListener('change', pickImage);
$('clear_image').addEventListener('click', clearImage);
$('strength').addEventListener('input', () => { $('strength_value').textContent = $('strength').value; });
$('cancel').addEventListener('click', () => controller && controller.abort());
fill().catch(err => { $('error').textContent = 'cannot reach the server: ' + err; });
</script>
</body>
</html>
"""
