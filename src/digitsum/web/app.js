// digitsum drawing page: pointer events draw on the canvas; while you draw, the canvas is sent
// to POST /api/predict (at most one request in flight, the newest drawing wins).
"use strict";

const pad = document.getElementById("pad");
const context = pad.getContext("2d");
const result = document.getElementById("result");
const statusLine = document.getElementById("status");
const STROKE = pad.width / 12; // MNIST strokes are about a tenth of the digit's height
const THROTTLE_MS = 80;

let number = 0;
let hasInk = false;
let drawing = false;
let last = null;
let dirty = false; // the drawing or number changed since the last request was sent
let inFlight = false;
let timer = null;
let generation = 0; // bumped by Clear so late answers for an old drawing are dropped

// ---------------------------------------------------------------- drawing

function clearPad() {
  context.fillStyle = "#fff";
  context.fillRect(0, 0, pad.width, pad.height);
  hasInk = false;
  generation += 1;
  dirty = false;
  showEmpty("Waiting for a drawing.");
}

function position(event) {
  const box = pad.getBoundingClientRect();
  return { x: (event.clientX - box.left) * (pad.width / box.width), y: (event.clientY - box.top) * (pad.height / box.height) };
}

function segment(from, to) {
  context.strokeStyle = "#111";
  context.lineWidth = STROKE;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.beginPath();
  context.moveTo(from.x, from.y);
  context.lineTo(to.x, to.y);
  context.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  if (event.pointerType === "mouse" && event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  last = position(event);
  segment(last, last); // a dot for a tap
  hasInk = true;
  requestPrediction();
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const each of events.length ? events : [event]) {
    const point = position(each);
    segment(last, point);
    last = point;
  }
  requestPrediction();
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  requestPrediction();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", clearPad);

// ---------------------------------------------------------------- the number picker

const picker = document.getElementById("numbers");
for (let n = 0; n <= 9; n++) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = String(n);
  button.setAttribute("role", "radio");
  button.dataset.number = String(n);
  button.addEventListener("click", () => pickNumber(n));
  picker.appendChild(button);
}

function pickNumber(n) {
  number = n;
  for (const button of picker.children) button.setAttribute("aria-checked", String(Number(button.dataset.number) === n));
  document.getElementById("number").textContent = String(n);
  if (hasInk) requestPrediction();
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement) return;
  if (/^[0-9]$/.test(event.key)) pickNumber(Number(event.key));
  if (event.key === "Escape" || event.key === "Backspace") clearPad();
});

// ---------------------------------------------------------------- predicting

function requestPrediction() {
  dirty = true;
  result.dataset.busy = "true";
  if (!inFlight && timer === null) timer = setTimeout(send, THROTTLE_MS);
}

function send() {
  timer = null;
  if (!dirty || !hasInk) {
    result.dataset.busy = "false";
    return;
  }
  dirty = false;
  inFlight = true;
  const sentFor = generation;
  const sentNumber = number;
  pad.toBlob(async (blob) => {
    try {
      const form = new FormData();
      form.append("image", blob, "drawing.png");
      form.append("number", String(sentNumber));
      const response = await fetch("/api/predict", { method: "POST", body: form });
      const body = await response.json();
      if (sentFor !== generation) return;
      if (response.ok) show(body);
      else showEmpty(body.detail && body.detail[0] ? body.detail[0].msg.replace(/^image: /, "") : `error ${response.status}`, true);
    } catch (error) {
      showEmpty(`no answer from the server (${error.message})`, true);
    } finally {
      inFlight = false;
      if (dirty) send();
      else result.dataset.busy = "false";
    }
  }, "image/png");
}

// ---------------------------------------------------------------- showing

function makeBars(container, count) {
  for (let i = 0; i < count; i++) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.innerHTML = '<div class="track"><div class="fill"></div></div><span class="label"></span>';
    bar.querySelector(".label").textContent = String(i);
    container.appendChild(bar);
  }
}

function setBars(container, probabilities) {
  const best = probabilities ? probabilities.indexOf(Math.max(...probabilities)) : -1;
  [...container.children].forEach((bar, i) => {
    const p = probabilities ? probabilities[i] : 0;
    bar.querySelector(".fill").style.height = `${(100 * p).toFixed(1)}%`;
    bar.classList.toggle("top", i === best);
    bar.title = `${i}: ${(100 * p).toFixed(1)}%`;
  });
}

function show(body) {
  document.getElementById("digit").textContent = String(body.digit);
  document.getElementById("sum").textContent = String(body.sum);
  document.getElementById("digit-p").textContent = `${(100 * body.digit_probabilities[body.digit]).toFixed(1)}% sure it is ${body.digit}`;
  // The sum block adds the digit the CNN read (one-hot) to the number, so its probability is the
  // confidence of that addition; how sure the model is of the image is the digit's probability.
  document.getElementById("sum-p").textContent =
    `${(100 * body.sum_probabilities[body.sum]).toFixed(1)}% sure of ${body.digit} + ${body.number}`;
  setBars(document.getElementById("digit-bars"), body.digit_probabilities);
  setBars(document.getElementById("sum-bars"), body.sum_probabilities);
  document.getElementById("view").src = body.image_28x28;
  statusLine.textContent = `answered in ${body.latency_ms.toFixed(1)} ms`;
  statusLine.classList.remove("error");
  result.dataset.number = String(body.number);
  result.dataset.digit = String(body.digit);
  result.dataset.sum = String(body.sum);
}

function showEmpty(message, isError = false) {
  document.getElementById("digit").textContent = "?";
  document.getElementById("sum").textContent = "?";
  document.getElementById("digit-p").textContent = "";
  document.getElementById("sum-p").textContent = "";
  setBars(document.getElementById("digit-bars"), null);
  setBars(document.getElementById("sum-bars"), null);
  document.getElementById("view").removeAttribute("src");
  statusLine.textContent = message;
  statusLine.classList.toggle("error", isError);
  delete result.dataset.number;
  delete result.dataset.digit;
  delete result.dataset.sum;
}

makeBars(document.getElementById("digit-bars"), 10);
makeBars(document.getElementById("sum-bars"), 19);
pickNumber(0);
clearPad();
fetch("/api/health").then((r) => r.json()).then((health) => {
  document.getElementById("model").textContent = `model ${health.model} · digitsum ${health.version}`;
}).catch(() => {});
