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
</style>
</head>
<body>
<h1>noisewise</h1>
<form id="form">
  <label for="prompt">Prompt</label><input type="text" id="prompt" value="a large red circle on the left">
  <label for="negative_prompt">Negative prompt</label><input type="text" id="negative_prompt" placeholder="model default">
  <label for="model">Model</label><select id="model"></select>
  <label for="sampler">Sampler</label><select id="sampler"></select>
  <label for="steps">Steps</label><input type="number" id="steps" min="1" value="20">
  <label for="guidance_scale">Guidance</label><input type="number" id="guidance_scale" min="0" max="50" step="0.5" value="7.5">
  <label for="seed">Seed</label><input type="number" id="seed" min="0" value="0">
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
async function fill() {
  const [m, s] = await Promise.all([fetch('/v1/models').then(r => r.json()), fetch('/v1/samplers').then(r => r.json())]);
  for (const x of m.models) $('model').add(new Option(x.name, x.name));
  for (const x of s.samplers) $('sampler').add(new Option(x.name + (x.stochastic ? ' (stochastic)' : ''), x.name));
  $('sampler').value = 'dpmpp_2m';
  document.body.dataset.ready = '1';
}
function request() {
  const neg = $('negative_prompt').value;
  return { prompt: $('prompt').value, negative_prompt: neg === '' ? null : neg, model: $('model').value,
           sampler: $('sampler').value, steps: parseInt($('steps').value), seed: parseInt($('seed').value),
           guidance_scale: parseFloat($('guidance_scale').value) };
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
      const d = typeof j.detail === 'string' ? j.detail : JSON.stringify(j.detail);
      $('error').textContent = `error ${r.status}: ${d}`; $('status').textContent = 'rejected'; return;
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
$('cancel').addEventListener('click', () => controller && controller.abort());
fill().catch(err => { $('error').textContent = 'cannot reach the server: ' + err; });
</script>
</body>
</html>
"""
