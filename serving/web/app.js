// The digit page: draw or send an image, show what the backend (serving/page.py) answers.
// No preprocessing here: the backend runs the repository's own and returns the 28×28 it made.
"use strict";

const PAD_SIZE = 280;
// About a fingertip on a phone, and after the 280 → 20 px scaling MNIST's ~2-3 px stroke width.
const STROKE = 22;
const DEBOUNCE_MS = 250;
// The backend's and TorchServe's request limit. Bigger photos are scaled down before sending:
// that is transport, not preprocessing (the decoded photo keeps its look, only fewer pixels).
const MAX_BYTES = 1024 * 1024;
const MAX_SIDE = 1024;

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d");

let drawing = null; // the pointerId of the stroke in progress
let last = null;
let inked = false;
let timer = null;
let latest = 0; // sequence number of the newest request; older answers are dropped
let inflight = 0;

function setIdle() {
  document.body.dataset.idle = String(timer === null && inflight === 0);
}

function resetPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, PAD_SIZE, PAD_SIZE);
  ctx.strokeStyle = ctx.fillStyle = "#000";
  ctx.lineWidth = STROKE;
  ctx.lineCap = ctx.lineJoin = "round";
  inked = false;
}

function padPoint(event) {
  const box = pad.getBoundingClientRect(); // the pad may be drawn smaller than its 280 px
  return { x: ((event.clientX - box.left) * PAD_SIZE) / box.width, y: ((event.clientY - box.top) * PAD_SIZE) / box.height };
}

function strokeTo(point) {
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  ctx.lineTo(point.x, point.y);
  ctx.stroke();
  last = point;
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = event.pointerId;
  last = padPoint(event);
  ctx.beginPath();
  ctx.arc(last.x, last.y, STROKE / 2, 0, 2 * Math.PI);
  ctx.fill();
  inked = true;
  schedule();
});

pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== drawing) return;
  // Coalesced events keep fast finger strokes smooth where the browser batches them.
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of events.length ? events : [event]) strokeTo(padPoint(e));
  schedule();
});

for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, (event) => {
    if (event.pointerId !== drawing) return;
    drawing = null;
    schedule();
  });
}

$("clear").addEventListener("click", () => {
  resetPad();
  clearTimeout(timer);
  timer = null;
  latest += 1; // an answer still in flight belongs to the old drawing
  showMessage("Draw a digit or send a photo.");
  $("answer").hidden = true;
  setIdle();
});

// Predict while drawing, once the pen rests for DEBOUNCE_MS: one request per pause, not per move.
function schedule() {
  clearTimeout(timer);
  timer = setTimeout(() => {
    timer = null;
    if (inked) pad.toBlob((blob) => send(blob), "image/png");
    else setIdle();
  }, DEBOUNCE_MS);
  setIdle();
}

async function send(blob) {
  const seq = ++latest;
  inflight += 1;
  setIdle();
  let status = 0;
  let body = null;
  try {
    const response = await fetch("/api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: await blob.arrayBuffer(), // bytes, not a Blob: devtools (and the tests) can see them
    });
    status = response.status;
    body = await response.json().catch(() => ({ error: `the page's server answered HTTP ${status}` }));
  } catch {
    body = { error: "the page's server is not answering: is `make ui` still running?", kind: "page-down" };
  } finally {
    inflight -= 1;
  }
  if (seq === latest) {
    if (status === 200) render(body);
    else showError(status, body);
    document.body.dataset.results = String(Number(document.body.dataset.results) + 1);
  }
  setIdle();
}

function showMessage(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.hidden = !text;
  message.classList.toggle("error", isError);
}

const ERROR_TITLES = {
  input: "Could not read a digit",
  down: "TorchServe is down",
  auth: "Bad token",
  server: "TorchServe failed",
  "page-down": "No connection",
};

function showError(status, body) {
  const title = ERROR_TITLES[body.kind] || `Error ${status}`;
  showMessage(`${title}: ${body.error || "unknown error"}`, true);
  $("answer").hidden = true;
}

function render(answer) {
  showMessage("");
  $("digit").textContent = String(answer.digit);
  $("confidence").textContent = `${(100 * answer.confidence).toFixed(1)}% confidence`;
  $("not-digit").hidden = answer.is_digit !== false;
  const bars = $("bars");
  bars.replaceChildren();
  for (let d = 0; d <= 9; d += 1) {
    const p = Number(answer.probabilities[String(d)] || 0);
    const bar = document.createElement("div");
    bar.className = d === answer.digit ? "bar best" : "bar";
    bar.innerHTML = '<span class="value"></span><div class="track"><div class="fill"></div></div><span class="label"></span>';
    bar.querySelector(".value").textContent = p >= 0.995 ? "100" : (100 * p).toFixed(0);
    bar.querySelector(".fill").style.height = `${(100 * p).toFixed(1)}%`;
    bar.querySelector(".label").textContent = String(d);
    bar.title = `${d}: ${(100 * p).toFixed(2)}%`;
    bars.append(bar);
  }
  bars.setAttribute("aria-label", `Probability of each digit, in percent; ${answer.digit} is the highest`);
  showPicture($("seen"), answer.input);
  showPicture($("heat"), answer.heatmap);
  $("seen-caption").textContent = answer.heatmap
    ? "The 28×28 image the model saw, with its attributions (red: for the answer, blue: against)"
    : "The 28×28 image the model saw";
  $("answer").hidden = false;
  resetCorrection(answer.id);
}

// --- corrections: the backend remembers each answer's 28×28 and version; the page names it by id ------

let answerId = null;

function resetCorrection(id) {
  answerId = id || null;
  $("correct").hidden = !answerId;
  $("label").value = "";
  $("keep-raw").checked = false;
  $("send-correction").disabled = true;
  correctionStatus("");
}

function correctionStatus(text, isError = false) {
  $("correct-status").textContent = text;
  $("correct-status").classList.toggle("error", isError);
}

async function sendCorrection() {
  const choice = $("label").value;
  if (!answerId || !choice) return;
  const label = choice === "not a digit" ? choice : Number(choice);
  $("send-correction").disabled = true;
  let status = 0;
  let body = {};
  try {
    const response = await fetch("/api/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: answerId, label, keep_raw: $("keep-raw").checked }),
    });
    status = response.status;
    body = await response.json().catch(() => ({ error: `the page's server answered HTTP ${status}` }));
  } catch {
    body = { error: "the page's server is not answering" };
  }
  if (status === 201) correctionStatus(`Thanks: stored as correction #${body.id}.`);
  else if (status === 200) correctionStatus(`Already stored (correction #${body.id}).`);
  else {
    correctionStatus(`Not stored: ${body.error || `HTTP ${status}`}`, true);
    $("send-correction").disabled = false;
  }
  document.body.dataset.corrections = String(Number(document.body.dataset.corrections || 0) + 1);
}

function showPicture(img, url) {
  img.hidden = !url;
  if (url) img.src = url;
  else img.removeAttribute("src");
}

// --- photos and files --------------------------------------------------------------------------

async function sendFile(file) {
  if (!file) return;
  const preview = $("preview");
  URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  preview.onerror = () => { preview.hidden = true; };
  send(await shrink(file));
}

// A phone photo is megabytes and 12 MP: scale it to MAX_SIDE on its longer side, as JPEG. The
// browser applies the photo's EXIF orientation while decoding, so it stays the right way up.
async function shrink(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    return file; // not an image the browser can read: the server says what is wrong with it
  }
  const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  if (scale === 1 && file.size <= MAX_BYTES) return file;
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(bitmap.width * scale);
  canvas.height = Math.round(bitmap.height * scale);
  const c = canvas.getContext("2d");
  c.fillStyle = "#fff"; // transparent pixels become white paper, as they look on the page
  c.fillRect(0, 0, canvas.width, canvas.height);
  c.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob((blob) => resolve(blob || file), "image/jpeg", 0.92));
}

for (const id of ["file", "camera"]) {
  $(id).addEventListener("change", (event) => {
    sendFile(event.target.files[0]);
    event.target.value = ""; // choosing the same file again still sends it
  });
}

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  sendFile(event.dataTransfer.files[0]);
});

document.addEventListener("paste", (event) => {
  const items = [...(event.clipboardData?.items || [])];
  const image = items.find((item) => item.type.startsWith("image/"));
  if (image) {
    event.preventDefault();
    sendFile(image.getAsFile());
    return;
  }
  const text = event.clipboardData?.getData("text") || "";
  if (text.startsWith("data:image/")) { // a data URL: the backend unwraps it
    event.preventDefault();
    send(new Blob([text.trim()]));
  }
});

resetPad();
setIdle();

$("label").addEventListener("change", () => { $("send-correction").disabled = !$("label").value; });
$("send-correction").addEventListener("click", sendCorrection);
