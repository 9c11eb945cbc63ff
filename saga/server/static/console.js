// The console's only script: confirmations with a reason for operator actions, live updates
// (server-sent events -> fetch the page again and swap the parts marked data-live), the
// timeline frame's height, and highlighting a compensation's undone span.
"use strict";

function confirmActions() {
  const dialog = document.getElementById("confirm");
  if (!dialog) return;
  document.querySelectorAll("form.action").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (form.dataset.confirmed === "yes") return;
      event.preventDefault();
      document.getElementById("confirm-text").textContent = form.dataset.confirm;
      document.getElementById("confirm-label").textContent = form.dataset.reasonLabel || "Reason";
      const reason = document.getElementById("confirm-reason");
      reason.value = "";
      dialog.returnValue = "";
      dialog.onclose = () => {
        if (dialog.returnValue !== "ok") return;
        form.querySelector("input[name=reason]").value = reason.value;
        form.dataset.confirmed = "yes";
        form.requestSubmit();
      };
      dialog.showModal();
      reason.focus();
    });
  });
}

async function refresh() {
  const response = await fetch(location.href, { headers: { "X-Live": "1" } });
  if (!response.ok) return;
  const next = new DOMParser().parseFromString(await response.text(), "text/html");
  document.querySelectorAll("[data-live]").forEach((part) => {
    const fresh = next.querySelector(`[data-live="${part.dataset.live}"]`);
    if (fresh) part.replaceWith(fresh);
  });
  const frame = document.getElementById("timeline");
  const root = next.getElementById("live-root");
  if (frame && root) frame.src = frame.src.replace(/seq=\d+/, `seq=${root.dataset.seq}`);
  confirmActions();
}

function live() {
  const root = document.getElementById("live-root");
  if (!root || !window.EventSource) return;
  const source = new EventSource(root.dataset.liveUrl);
  let first = true;
  source.addEventListener(root.dataset.liveEvent, (event) => {
    const data = JSON.parse(event.data);
    if (root.dataset.liveEvent === "saga") {
      if (String(data.seq) === root.dataset.seq) return;
      root.dataset.seq = String(data.seq);
    } else if (first) {
      first = false;
      return; // the page was rendered with these counts
    }
    refresh();
  });
}

function sizeTimeline() {
  const frame = document.getElementById("timeline");
  if (!frame) return;
  frame.addEventListener("load", () => {
    const doc = frame.contentDocument;
    if (doc && doc.body) frame.style.height = doc.documentElement.scrollHeight + 8 + "px";
  });
}

function linkCompensations() {
  document.querySelectorAll("a.undoes").forEach((a) => {
    const target = document.getElementById("span-" + a.dataset.undoes);
    if (!target) return;
    a.addEventListener("mouseenter", () => target.classList.add("hl"));
    a.addEventListener("mouseleave", () => target.classList.remove("hl"));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  confirmActions();
  live();
  sizeTimeline();
  linkCompensations();
});
