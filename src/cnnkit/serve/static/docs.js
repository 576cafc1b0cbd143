// The API's documentation, drawn from /openapi.json (FastAPI's own /docs would load Swagger UI from a CDN).
"use strict";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function parameters(operation) {
  const rows = (operation.parameters || []).map((p) => [p.name, `${p.in}${p.required ? ", required" : ""}`, p.description || ""]);
  const form = operation.requestBody?.content?.["multipart/form-data"];
  if (form) {
    rows.push(["file", "multipart form field, required", "an image file: PNG, JPEG, BMP, GIF, TIFF..."]);
  }
  return rows;
}

fetch("/openapi.json")
  .then((response) => response.json())
  .then((spec) => {
    // The description's `code` spans as code, and its example address as this server's own.
    const intro = document.getElementById("intro");
    const description = (spec.info.description || "").replace(/https?:\/\/[^/\s`]+/g, location.origin);
    intro.replaceChildren(...description.split("`").map((text, i) => (i % 2 ? element("code", "", text) : text)));
    const root = document.getElementById("routes");
    for (const [path, methods] of Object.entries(spec.paths)) {
      for (const [method, operation] of Object.entries(methods)) {
        const card = element("section", "card docs-route");
        const title = element("h2");
        title.append(element("code", "method", method.toUpperCase()), " ", element("code", "", path), "  ", element("span", "muted", operation.summary || ""));
        card.append(title);
        if (operation.description) card.append(element("p", "small", operation.description));
        const rows = parameters(operation);
        if (rows.length) {
          const table = element("table", "small");
          for (const row of rows) {
            const tr = element("tr");
            row.forEach((cell, i) => tr.append(element(i ? "td" : "th", "", cell)));
            table.append(tr);
          }
          card.append(table);
        }
        const codes = Object.keys(operation.responses || {}).join(", ");
        card.append(element("p", "small muted", `responses: ${codes}; errors are {"error": "..."} (400, 404, 413, 422, 503)`));
        root.append(card);
      }
    }
  })
  .catch((error) => {
    document.getElementById("routes").textContent = `could not read /openapi.json (${error.message})`;
  });
