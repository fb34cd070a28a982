// moderator review console: keyboard shortcuts, reveal, the grid's verdicts. No inline script anywhere:
// the Content-Security-Policy allows this file only. Verdicts from the grid are fetch() POSTs that
// carry the session's CSRF token in the X-CSRF-Token header.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    });
  }

  // The page gets a small blurred rendition; the original is served only after the reveal is recorded.
  async function reveal(shield, handle) {
    if (!shield) return; // an image refused (it changed since it was scored) has nothing to reveal
    const shown = shield.classList.toggle("revealed");
    if (shown && handle && !shield.dataset.counted) {
      shield.dataset.counted = "1"; // one exposure per image and page view
      const response = await post("/api/revealed", { handle });
      const answer = await response.json().catch(() => ({}));
      const img = shield.querySelector("img");
      if (response.ok && answer.original && img) img.src = answer.original;
    }
  }

  function typing(event) {
    const t = event.target;
    return t instanceof HTMLTextAreaElement || (t instanceof HTMLInputElement && t.type !== "checkbox");
  }

  // --- the item page -----------------------------------------------------------------------------
  const item = document.querySelector(".item");
  if (item) {
    const handle = item.dataset.handle;
    const shield = document.getElementById("shield");
    if (shield) {
      shield.addEventListener("click", () => reveal(shield, handle));
      document.getElementById("reveal").addEventListener("click", () => reveal(shield, handle));
    }
    const lease = document.getElementById("lease");
    let left = parseInt(lease.dataset.seconds, 10);
    setInterval(() => {
      left = Math.max(0, left - 1);
      lease.textContent = left > 0 ? `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")}` : "expired";
    }, 1000);
  }

  // --- the grid ------------------------------------------------------------------------------------
  const grid = document.getElementById("grid");
  const tiles = grid ? Array.from(grid.querySelectorAll(".tile")) : [];
  let selected = 0;

  function select(i) {
    if (!tiles.length) return;
    selected = (i + tiles.length) % tiles.length;
    tiles.forEach((t, j) => t.classList.toggle("selected", j === selected));
    tiles[selected].focus();
  }

  async function judge(tile, verdict) {
    if (tile.classList.contains("done")) return;
    const categories = verdict === "confirm" ? tile.dataset.categories.split(",").filter(Boolean) : [];
    const status = tile.querySelector(".status");
    const response = await post("/api/verdict", { handle: tile.dataset.handle, verdict, categories });
    const answer = await response.json().catch(() => ({}));
    if (response.ok) {
      tile.classList.add("done");
      status.textContent = verdict;
      const next = tiles.findIndex((t) => !t.classList.contains("done"));
      if (next >= 0) select(next);
    } else {
      status.textContent = answer.error || `failed (${response.status})`;
    }
  }

  tiles.forEach((tile, i) => {
    const shield = tile.querySelector(".shield");
    shield.addEventListener("click", () => { select(i); reveal(shield, tile.dataset.handle); });
    tile.addEventListener("click", () => select(i));
    tile.querySelectorAll("button[data-verdict]").forEach((b) =>
      b.addEventListener("click", (e) => { e.stopPropagation(); judge(tile, b.dataset.verdict); }));
  });
  if (tiles.length) select(0);

  // --- keys --------------------------------------------------------------------------------------
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event)) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    const key = event.key.toLowerCase();
    if (tiles.length) {
      const tile = tiles[selected];
      const moves = { arrowright: 1, arrowleft: -1, arrowdown: 4, arrowup: -4 };
      if (key in moves) { select(selected + moves[key]); event.preventDefault(); return; }
      if (key === "r" || key === " ") { reveal(tile.querySelector(".shield"), tile.dataset.handle); event.preventDefault(); return; }
      const verdicts = { c: "confirm", o: "overturn", e: "escalate" };
      if (key in verdicts) { judge(tile, verdicts[key]); return; }
    }
    if (item && (key === "r" || key === " ")) { document.getElementById("reveal")?.click(); event.preventDefault(); return; }
    if (item && key === "/") { document.getElementById("note").focus(); event.preventDefault(); return; }
    if (item && /^[1-9]$/.test(key)) {
      const box = document.querySelector(`input[name="category"][data-index="${key}"]`);
      if (box) box.checked = !box.checked;
      return;
    }
    const button = document.querySelector(`button[data-key="${key}"]`);
    if (button) { button.click(); event.preventDefault(); }
  });
})();
