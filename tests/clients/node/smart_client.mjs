// The SMART on FHIR JavaScript client (npm "fhirclient"), as a SMART app that already holds an access
// token: walks every `next` link of a search and prints what it got as one JSON line.
//   node smart_client.mjs <FHIR base> <relative search URL>     (the token in FHIR_ACCESS_TOKEN)
import smart from "fhirclient";

const [serverUrl, query] = process.argv.slice(2);
const token = process.env.FHIR_ACCESS_TOKEN;
if (!serverUrl || !query || !token) {
  console.error("usage: FHIR_ACCESS_TOKEN=... node smart_client.mjs <FHIR base> <search URL>");
  process.exit(2);
}
// a back-end script has no HTTP request of its own: the Node adapter gets a minimal one
const client = smart({ url: "/", headers: {}, method: "GET" }, {}).client({
  serverUrl,
  tokenResponse: { access_token: token },
});
try {
  const first = await client.request(query);
  const resources = await client.request(query, { pageLimit: 0, flat: true });
  console.log(
    JSON.stringify({
      client: "fhirclient",
      total: first.total ?? null,
      firstPage: (first.entry || []).length,
      next: (first.link || []).filter((l) => l.relation === "next").map((l) => l.url),
      resources: resources.map((r) => ({ type: r.resourceType, id: r.id })),
    }),
  );
} catch (err) {
  console.error(`fhirclient failed: ${err.status ?? ""} ${err.message}`);
  process.exit(1);
}
