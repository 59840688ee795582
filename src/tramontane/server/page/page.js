// The chat page of `tramontane serve`: a client of the server's own OpenAI API, with no dependency.
//
// Each turn sends the whole conversation (the system prompt first, when there is one) to
// v1/chat/completions with stream: true, and reads the server-sent events from fetch's stream.
// What the model writes is put into the page as text nodes (`renderMarkdown` builds elements and
// sets textContent): it is never parsed as HTML, so no tag the model writes can run.
"use strict";

const KEY_STORE = "tramontane-api-key";
const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), temperature: $("temperature"), maxTokens: $("max-tokens"), newChat: $("new-chat"),
  keyForm: $("key-form"), key: $("key"), system: $("system"), log: $("log"), error: $("error"),
  compose: $("compose"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
};
let history = [];  // the conversation's {role, content} turns, without the system prompt
let running = null;  // the AbortController of the answer being streamed

// ---------------------------------------------------------------------------------------------- API
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

class APIFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// The error of a failed answer: OpenAI's {"error": {"message"}} body when there is one.
async function failure(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new APIFailure(response.status, message);
}

async function loadModels() {
  const response = await fetch("v1/models", { headers: headers() });
  if (response.status === 401) {
    const hadKey = sessionStorage.getItem(KEY_STORE) !== null;
    sessionStorage.removeItem(KEY_STORE);
    askForKey(hadKey ? "That key was refused: enter the server's API key." : null);
    return;
  }
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  const chosen = ui.model.value;
  ui.model.replaceChildren(...body.data.map((card) => {
    const option = document.createElement("option");
    option.value = option.textContent = card.id;
    return option;
  }));
  if (body.data.some((card) => card.id === chosen)) ui.model.value = chosen;
  ui.keyForm.hidden = true;
  showError(null);
}

function askForKey(message) {
  ui.keyForm.hidden = false;
  ui.key.value = "";
  ui.key.focus();
  showError(message);
}

// Yields the parsed JSON of each server-sent event until [DONE]; a partial event waits for its end.
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;  // a comment or keep-alive
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------------------------------------- chat
function request(messages) {
  const body = { model: ui.model.value, messages, stream: true };
  const temperature = parseFloat(ui.temperature.value);
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

async function send(text) {
  const system = ui.system.value.trim();
  const turn = { role: "user", content: text };
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, turn];
  const conversation = history;  // "New chat" during the answer starts another one
  const asked = addTurn("user", text);
  const answer = addTurn("assistant", "");
  answer.classList.add("streaming");
  let content = "";
  let ending = null;  // what the note under the answer says
  running = new AbortController();
  setBusy(true);
  showError(null);
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request(messages)), signal: running.signal,
    });
    if (!response.ok) throw await failure(response);
    for await (const event of events(response.body)) {
      if (event.error) throw new APIFailure(0, event.error.message || "the server ended the answer");
      const choice = event.choices && event.choices[0];
      if (!choice) continue;  // the usage chunk
      if (choice.delta && choice.delta.content) {
        content += choice.delta.content;
        renderMarkdown(content, answer.querySelector(".content"));
      }
      if (choice.finish_reason === "length") ending = "stopped at the token limit";
    }
  } catch (error) {
    if (error.name === "AbortError") {
      ending = "stopped";
      answer.classList.add("stopped");
    } else {
      if (!content) {  // nothing came back: give the message back to edit and resend
        asked.remove();
        answer.remove();
        ui.prompt.value = text;
      }
      showError(error.message);
      if (error.status === 401) askForKey(error.message);
      if (!content) return;
    }
  } finally {
    running = null;
    setBusy(false);
    answer.classList.remove("streaming");
  }
  conversation.push(turn, { role: "assistant", content });
  if (ending) {
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = ending;
    answer.append(note);
  }
}

function addTurn(role, text) {
  const turn = document.createElement("article");
  turn.className = "turn " + role;
  const content = document.createElement("div");
  content.className = "content";
  turn.append(content);
  renderMarkdown(text, content);
  ui.log.append(turn);
  turn.scrollIntoView({ block: "end" });
  return turn;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.compose.dataset.busy = busy ? "true" : "false";
}

function showError(message) {
  ui.error.hidden = !message;
  ui.error.textContent = message || "";
}

// ---------------------------------------------------------------------------------------------- markdown
// A small subset, built as elements around text nodes: paragraphs, fenced code blocks, - and 1. lists,
// **bold**, *italic* and `code`. Anything else, HTML included, stays the text it is.
const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
const ITEM = /^\s*(?:[-*+]|(\d{1,9})[.)])\s+(.*)$/;
const BLANK = /^\s*$/;
const INLINE = /`([^`\n]+)`|\*\*(?=\S)([\s\S]+?)\*\*|\*(?=[^\s*])([^*]+?)\*/g;

function renderMarkdown(text, into) {
  into.replaceChildren();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const fence = lines[i].match(FENCE);
    if (fence) {  // a code block, up to the closing fence (or the end, while it streams)
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      i++;
      const pre = element("pre"), block = element("code", code.join("\n"));
      if (fence[1]) block.dataset.lang = fence[1];
      pre.append(block);
      into.append(pre);
    } else if (BLANK.test(lines[i])) {
      i++;
    } else if (ITEM.test(lines[i])) {
      const ordered = lines[i].match(ITEM)[1] !== undefined;
      const list = element(ordered ? "ol" : "ul");
      for (let m; i < lines.length && (m = lines[i].match(ITEM)) && (m[1] !== undefined) === ordered; i++) {
        if (ordered && list.children.length === 0 && m[1] !== "1") list.start = Number(m[1]);
        const item = element("li");
        inline(m[2], item);
        list.append(item);
      }
      into.append(list);
    } else {
      const para = [];
      for (; i < lines.length && !BLANK.test(lines[i]) && !FENCE.test(lines[i]) && !ITEM.test(lines[i]); i++) {
        para.push(lines[i]);
      }
      const p = element("p");
      inline(para.join("\n"), p);
      into.append(p);
    }
  }
}

function inline(text, into) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    into.append(text.slice(last, m.index));  // a string becomes a text node
    if (m[1] !== undefined) into.append(element("code", m[1]));
    else {
      const span = element(m[2] !== undefined ? "strong" : "em");
      inline(m[2] !== undefined ? m[2] : m[3], span);
      into.append(span);
    }
    last = m.index + m[0].length;
  }
  into.append(text.slice(last));
}

function element(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------------------------------------- wiring
ui.compose.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || running) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.compose.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => { if (running) running.abort(); });
ui.newChat.addEventListener("click", () => {
  if (running) running.abort();
  history = [];
  ui.log.replaceChildren();
  showError(null);
});
ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, ui.key.value.trim());
  loadModels().catch((error) => showError(error.message));
});

setBusy(false);
loadModels().catch((error) => showError(error.message));
