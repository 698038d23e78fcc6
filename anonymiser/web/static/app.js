// The local anonymiser page. Plain JavaScript, no framework, no external requests.
//
// Privacy model: the server keeps nothing between requests. This page keeps the person's own
// file (a File object on their own machine) so that a reviewed version can be made: it sends the
// ORIGINAL again with the final list of covers to /api/cover. The original is never displayed;
// only covered results are shown, and the review overlay only draws rectangles over them.
"use strict";

(() => {
  const MB = 1024 * 1024;
  const settings = { maxBytes: Infinity };
  let queue = Promise.resolve(); // photos are sent one after another, in the order given
  let added = 0; // photos added so far: the number in each download's name

  const $ = (selector, root = document) => root.querySelector(selector);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ------------------------------------------------------------------ start-up

  async function init() {
    for (const input of [$("#pick"), $("#camera")]) {
      input.addEventListener("change", () => {
        addFiles(input.files);
        input.value = ""; // picking the same photo again must work too
      });
    }
    setUpDragAndDrop();
    try {
      const response = await fetch("/api/health", { headers: { Accept: "application/json" } });
      const health = await response.json();
      $("#style").value = health.style;
      $("#skin-tone").value = health.skin_tone;
      settings.maxBytes = health.max_input_bytes;
      if (health.warning) {
        const warning = $("#coverage-warning");
        warning.textContent = health.warning;
        warning.hidden = false;
      }
      document.body.dataset.ready = "true";
    } catch (error) {
      document.body.dataset.ready = "true"; // the server answers errors per photo anyway
    }
  }

  function setUpDragAndDrop() {
    const zone = $("#drop");
    let depth = 0; // dragenter/dragleave fire for every child element
    document.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      depth += 1;
      zone.classList.add("dragging");
    });
    document.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) zone.classList.remove("dragging");
    });
    document.addEventListener("dragover", (event) => {
      if (hasFiles(event)) event.preventDefault(); // allows dropping anywhere on the page
    });
    document.addEventListener("drop", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      depth = 0;
      zone.classList.remove("dragging");
      addFiles(event.dataTransfer.files);
    });
  }

  function hasFiles(event) {
    return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  }

  // ------------------------------------------------------------------ one card per photo

  function addFiles(fileList) {
    for (const file of Array.from(fileList || [])) {
      const card = new Card(file);
      $("#results").prepend(card.el);
      queue = queue.then(() => card.anonymise()).catch(() => {});
    }
  }

  class Card {
    constructor(file) {
      this.file = file;
      this.number = ++added;
      this.el = $("#card-template").content.firstElementChild.cloneNode(true);
      this.img = $(".result", this.el);
      this.overlay = $(".overlay", this.el);
      this.regions = []; // [{box: [x1, y1, x2, y2], sources: [...]}] in output pixels
      this.width = 0;
      this.height = 0;
      this.url = null;
      this.mime = "image/jpeg";
      this.edit = null; // {removed: Set of indexes, added: [box...]} while reviewing
      this.pointer = null;
      $(".name", this.el).textContent = file.name || "photo";
      this.setState("waiting", "Waiting…");
      $(".review", this.el).addEventListener("click", () => this.startReview());
      $(".apply", this.el).addEventListener("click", () => this.apply());
      $(".cancel", this.el).addEventListener("click", () => this.stopReview());
      $(".download", this.el).addEventListener("click", () => this.download());
      this.overlay.addEventListener("pointerdown", (event) => this.pointerDown(event));
      this.overlay.addEventListener("pointermove", (event) => this.pointerMove(event));
      this.overlay.addEventListener("pointerup", (event) => this.pointerUp(event));
      this.overlay.addEventListener("pointercancel", () => this.pointerCancel());
    }

    setState(state, status) {
      this.el.dataset.state = state;
      $(".status", this.el).textContent = status;
    }

    showError(message) {
      this.setState("error", "Not anonymised");
      const error = $(".error", this.el);
      error.textContent = message;
      error.hidden = false;
    }

    async anonymise() {
      if (this.file.size > settings.maxBytes) {
        this.showError(
          `This file is ${(this.file.size / MB).toFixed(1)} MB; the limit is ${(settings.maxBytes / MB).toFixed(0)} MB.`,
        );
        return;
      }
      const answer = await this.post("/api/anonymise", {});
      if (answer) this.show(answer, answer.regions);
    }

    // Sends the original file (and fields) and returns the JSON answer, or null after showing
    // the error. A busy server (503) is waited for, as its Retry-After asks.
    async post(url, fields) {
      for (let attempt = 0; attempt < 60; attempt += 1) {
        this.setState("uploading", "Uploading…");
        const progress = $(".progress", this.el);
        progress.value = 0;
        const result = await send(url, this.file, fields, (fraction) => {
          progress.value = Math.round(fraction * 100);
          if (fraction >= 1) this.setState("processing", "Covering heads…");
        });
        if (result.status === 503) {
          this.setState("waiting", "Server busy, waiting…");
          await sleep(1000 * (result.retryAfter || 3));
          continue;
        }
        if (result.status === 200 && result.body && result.body.image) return result.body;
        const message = result.body && result.body.message
          ? result.body.message
          : result.status === 0
            ? "The anonymiser could not be reached. Is it still running?"
            : `The anonymiser answered with an error (${result.status}).`;
        this.showError(message);
        return null;
      }
      this.showError("The anonymiser stayed busy for too long; please try again.");
      return null;
    }

    show(answer, regions) {
      const blob = new Blob([decodeBase64(answer.image)], { type: answer.mime });
      if (this.url) URL.revokeObjectURL(this.url);
      this.url = URL.createObjectURL(blob);
      this.mime = answer.mime;
      this.width = answer.width;
      this.height = answer.height;
      this.regions = regions.map((r) => ({ box: r.box.slice(), sources: r.sources.slice() }));
      this.img.src = this.url;
      $(".figure", this.el).hidden = false;
      $(".error", this.el).hidden = true;
      this.el.dataset.regions = JSON.stringify(this.regions);
      this.showCount();
      this.setState("done", "Done");
      $(".review", this.el).hidden = false;
      $(".download", this.el).hidden = false;
    }

    showCount() {
      const isGap = (r) => r.sources.length === 1 && r.sources[0] === "safeguard";
      const heads = this.regions.filter((r) => !isGap(r)).length;
      const manual = this.regions.filter((r) => r.sources.includes("manual")).length;
      const gaps = this.regions.length - heads;
      const line = $(".heads", this.el);
      line.textContent = "";
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = String(heads);
      line.append(count, ` head${heads === 1 ? "" : "s"} covered`);
      if (manual) line.append(` (${manual} by you)`);
      if (gaps) line.append(`, plus ${gaps} cover${gaps === 1 ? "" : "s"} between packed heads`);
      this.el.dataset.heads = String(heads);
    }

    download() {
      const link = document.createElement("a");
      link.href = this.url;
      link.download = downloadName(this.number, this.mime);
      document.body.append(link);
      link.click();
      link.remove();
    }

    // -------------------------------------------------------------- review

    startReview() {
      this.edit = { removed: new Set(), added: [] };
      this.el.classList.add("reviewing");
      this.overlay.hidden = false;
      this.toggleButtons(true);
      this.draw();
    }

    stopReview() {
      this.edit = null;
      this.pointer = null;
      this.el.classList.remove("reviewing");
      this.overlay.hidden = true;
      this.overlay.replaceChildren();
      this.toggleButtons(false);
    }

    toggleButtons(reviewing) {
      $(".review", this.el).hidden = reviewing;
      $(".download", this.el).hidden = reviewing;
      $(".apply", this.el).hidden = !reviewing;
      $(".cancel", this.el).hidden = !reviewing;
      $(".help", this.el).hidden = !reviewing;
    }

    async apply() {
      const { removed, added } = this.edit;
      if (!removed.size && !added.length) {
        this.stopReview();
        return;
      }
      const final = this.regions
        .filter((_, index) => !removed.has(index))
        .concat(added.map((box) => ({ box, sources: ["manual"] })));
      this.stopReview();
      $(".review", this.el).hidden = true;
      $(".download", this.el).hidden = true;
      const answer = await this.post("/api/cover", {
        regions: JSON.stringify(final.map((r) => r.box)),
      });
      if (!answer) {
        $(".review", this.el).hidden = false; // the previous result is still shown and valid
        $(".download", this.el).hidden = false;
        this.setState("done", "Changes not applied");
        return;
      }
      // The server clips boxes to the image; keep who asked for each cover.
      if (answer.regions.length === final.length) {
        answer.regions.forEach((region, index) => { final[index].box = region.box; });
      }
      this.show(answer, final);
    }

    draw(draft) {
      const boxes = [];
      this.regions.forEach((region, index) => {
        const box = this.boxElement(region.box, this.edit.removed.has(index) ? "removed" : "");
        box.dataset.index = String(index);
        box.title = this.edit.removed.has(index) ? "Will be uncovered (tap to keep)" : "Tap to uncover";
        boxes.push(box);
      });
      this.edit.added.forEach((rect, index) => {
        const box = this.boxElement(rect, "added");
        box.dataset.added = String(index);
        box.title = "New cover (tap to remove)";
        boxes.push(box);
      });
      if (draft) boxes.push(this.boxElement(draft, "draft"));
      this.overlay.replaceChildren(...boxes);
      // Uncovering shows a person: the button says so, so that a stray tap is not applied unseen.
      const uncovering = this.edit.removed.size;
      $(".apply", this.el).textContent = uncovering
        ? `Apply: uncover ${uncovering} ${uncovering === 1 ? "person" : "people"}`
        : "Apply changes";
    }

    boxElement([x1, y1, x2, y2], kind) {
      const box = document.createElement("div");
      box.className = kind ? `box ${kind}` : "box";
      // Percentages keep the rectangles on their heads whatever size the image is shown at.
      // (Setting element.style from script is allowed by the page's Content-Security-Policy.)
      box.style.left = `${(100 * x1) / this.width}%`;
      box.style.top = `${(100 * y1) / this.height}%`;
      box.style.width = `${(100 * (x2 - x1)) / this.width}%`;
      box.style.height = `${(100 * (y2 - y1)) / this.height}%`;
      return box;
    }

    toImage(event) {
      const rect = this.img.getBoundingClientRect();
      const x = ((event.clientX - rect.left) / rect.width) * this.width;
      const y = ((event.clientY - rect.top) / rect.height) * this.height;
      return [clamp(x, 0, this.width), clamp(y, 0, this.height)];
    }

    pointerDown(event) {
      if (!this.edit || event.button !== 0) return;
      event.preventDefault();
      this.overlay.setPointerCapture(event.pointerId);
      this.pointer = {
        id: event.pointerId,
        start: this.toImage(event),
        client: [event.clientX, event.clientY],
        target: event.target.closest(".box"),
        dragging: false,
      };
    }

    pointerMove(event) {
      const p = this.pointer;
      if (!p || p.id !== event.pointerId) return;
      const moved = Math.hypot(event.clientX - p.client[0], event.clientY - p.client[1]);
      if (moved > 8) p.dragging = true; // a small wobble of a finger is still a tap
      if (p.dragging) this.draw(rectBetween(p.start, this.toImage(event)));
    }

    pointerUp(event) {
      const p = this.pointer;
      if (!p || p.id !== event.pointerId) return;
      this.pointer = null;
      if (p.dragging) {
        const rect = rectBetween(p.start, this.toImage(event));
        if (rect[2] - rect[0] >= 4 && rect[3] - rect[1] >= 4) this.edit.added.push(rect);
      } else if (p.target && p.target.dataset.added !== undefined) {
        this.edit.added.splice(Number(p.target.dataset.added), 1);
      } else if (p.target && p.target.dataset.index !== undefined) {
        const index = Number(p.target.dataset.index);
        if (this.edit.removed.has(index)) this.edit.removed.delete(index);
        else this.edit.removed.add(index);
      } else {
        this.edit.added.push(this.defaultBox(p.start));
      }
      this.draw();
    }

    pointerCancel() {
      this.pointer = null;
      if (this.edit) this.draw();
    }

    // A tap adds a cover the size of a typical covered head in this photo (the median of the
    // automatic covers), or 6 % of the short side when nothing was found.
    defaultBox([x, y]) {
      const heads = this.regions.filter((r) => !(r.sources.length === 1 && r.sources[0] === "safeguard"));
      let w;
      let h;
      if (heads.length) {
        w = median(heads.map((r) => r.box[2] - r.box[0]));
        h = median(heads.map((r) => r.box[3] - r.box[1]));
      } else {
        w = h = Math.max(16, Math.round(0.06 * Math.min(this.width, this.height)));
      }
      w = Math.min(w, this.width);
      h = Math.min(h, this.height);
      const x1 = clamp(Math.round(x - w / 2), 0, this.width - w);
      const y1 = clamp(Math.round(y - h / 2), 0, this.height - h);
      return [x1, y1, x1 + w, y1 + h];
    }
  }

  // ------------------------------------------------------------------ helpers

  function send(url, file, fields, onProgress) {
    return new Promise((resolve) => {
      const form = new FormData();
      // A neutral file name: the server has no use for the person's own file name.
      form.append("file", file, "upload");
      form.append("style", $("#style").value);
      form.append("skin_tone", $("#skin-tone").value);
      for (const [name, value] of Object.entries(fields)) form.append(name, value);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `${url}?format=json`);
      xhr.responseType = "json";
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", (event) => {
        if (event.lengthComputable) onProgress(event.loaded / event.total);
      });
      xhr.upload.addEventListener("load", () => onProgress(1));
      xhr.addEventListener("load", () => resolve({
        status: xhr.status,
        body: xhr.response,
        retryAfter: Number(xhr.getResponseHeader("Retry-After")) || 0,
      }));
      xhr.addEventListener("error", () => resolve({ status: 0, body: null, retryAfter: 0 }));
      xhr.send(form);
    });
  }

  function decodeBase64(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  // Not the original's name: phones name photos by the second they were taken
  // (PXL_20240501_143012345.jpg), and messengers and file shares pass names on.
  function downloadName(number, mime) {
    return `anonymised-${number}.${mime === "image/png" ? "png" : "jpg"}`;
  }

  function rectBetween([ax, ay], [bx, by]) {
    return [Math.round(Math.min(ax, bx)), Math.round(Math.min(ay, by)), Math.round(Math.max(ax, bx)), Math.round(Math.max(ay, by))];
  }

  function clamp(value, low, high) {
    return Math.min(Math.max(value, low), high);
  }

  function median(values) {
    const sorted = values.slice().sort((a, b) => a - b);
    const middle = Math.floor(sorted.length / 2);
    return Math.round(sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2);
  }

  init();
})();
