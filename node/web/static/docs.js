// Swagger UI over /api/openapi.json, with the token the dashboard keeps for this tab.
"use strict";

const token = sessionStorage.getItem("ainode-token") || "";
if (!token) document.getElementById("sign-in").hidden = false;
window.SwaggerUIBundle({
  url: "/api/openapi.json",
  dom_id: "#swagger-ui",
  requestInterceptor: (request) => {
    if (token) request.headers.Authorization = `Bearer ${token}`;
    return request;
  },
});
