// The API's documentation, drawn from /openapi.json (FastAPI's own /docs would load Swagger UI from a CDN).
"use strict";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A schema's kind in a few words: "integer >= 0", "string", "object: split, index", ...
function kind(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) {
    const named = spec.components?.schemas?.[schema.$ref.split("/").pop()];
    return named ? `object: ${Object.keys(named.properties || {}).join(", ")}` : "object";
  }
  if (schema.anyOf) return schema.anyOf.map((s) => kind(s, spec)).filter((k) => k !== "null").join(" or ");
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  const bound = schema.minimum !== undefined ? ` >= ${schema.minimum}` : "";
  return `${schema.type || ""}${bound}`;
}

function parameters(operation, spec) {
  const rows = (operation.parameters || []).map((p) => [p.name, `${p.in}${p.required ? ", required" : ""}`, p.description || ""]);
  const form = operation.requestBody?.content?.["multipart/form-data"];
  if (form) {
    rows.push(["file", "multipart form field, required", "an image file: PNG, JPEG, BMP, GIF, TIFF..."]);
  }
  const json = operation.requestBody?.content?.["application/json"]?.schema;
  const body = json?.$ref ? spec.components?.schemas?.[json.$ref.split("/").pop()] : null;
  for (const [name, field] of Object.entries(body?.properties || {})) {
    const required = (body.required || []).includes(name) ? ", required" : "";
    rows.push([name, `JSON field, ${kind(field, spec)}${required}`, field.description || ""]);
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
        const rows = parameters(operation, spec);
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
        card.append(element("p", "small muted", `responses: ${codes}; errors are {"error": "..."} (400, 404, 413, 422, 503); the JSON routes' answers are described in docs/serve-page.md`));
        root.append(card);
      }
    }
  })
  .catch((error) => {
    document.getElementById("routes").textContent = `could not read /openapi.json (${error.message})`;
  });
