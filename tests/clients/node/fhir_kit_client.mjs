// fhir-kit-client (npm "fhir-kit-client"): search, then nextPage until there is none, asking for
// `application/json+fhir` (the DSTU2 media type many older servers and clients still send). Prints
// what it got as one JSON line.
//   node fhir_kit_client.mjs <FHIR base> <resource type> <search parameters as a query string>
//   (the token in FHIR_ACCESS_TOKEN)
import { Client } from "fhir-kit-client";

const [baseUrl, resourceType, query] = process.argv.slice(2);
const token = process.env.FHIR_ACCESS_TOKEN;
if (!baseUrl || !resourceType || query === undefined || !token) {
  console.error("usage: FHIR_ACCESS_TOKEN=... node fhir_kit_client.mjs <FHIR base> <type> <query>");
  process.exit(2);
}
const client = new Client({
  baseUrl,
  customHeaders: { Authorization: `Bearer ${token}`, Accept: "application/json+fhir" },
});
const searchParams = Object.fromEntries(new URLSearchParams(query));
try {
  let bundle = await client.search({ resourceType, searchParams });
  const total = bundle.total ?? null;
  const pages = [];
  const resources = [];
  for (;;) {
    pages.push((bundle.link || []).find((l) => l.relation === "self")?.url ?? null);
    for (const entry of bundle.entry || []) {
      resources.push({ type: entry.resource.resourceType, id: entry.resource.id, mode: entry.search?.mode });
    }
    const next = await client.nextPage({ bundle });
    if (!next) break;
    bundle = next;
  }
  console.log(JSON.stringify({ client: "fhir-kit-client", total, pages, resources }));
} catch (err) {
  const status = err.response?.status ?? "";
  console.error(`fhir-kit-client failed: ${status} ${err.message} ${JSON.stringify(err.response?.data ?? "")}`);
  process.exit(1);
}
