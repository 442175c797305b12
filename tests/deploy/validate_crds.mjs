// Validates Prometheus Operator objects (PodMonitor, ServiceMonitor, PrometheusRule) against the CRD
// schemas compiled into @kubernetes-models/prometheus-operator. Input: a JSON array of objects on stdin.
// Output: one line per object, "ok KIND/NAME" or "error KIND/NAME: message"; exit 1 on any error.
// Run: node validate_crds.mjs (with NODE_PATH-independent import from the package folder given as argv[2]).
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import path from "node:path";

const root = process.argv[2];
const v1 = await import(pathToFileURL(path.join(root, "node_modules/@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js")).href);
const docs = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const doc of docs) {
  const name = `${doc.kind}/${doc.metadata?.name}`;
  const Kind = v1[doc.kind];
  if (doc.apiVersion !== "monitoring.coreos.com/v1" || !Kind) {
    console.log(`error ${name}: not a monitoring.coreos.com/v1 kind this validator knows`);
    failed = true;
    continue;
  }
  try {
    new Kind(doc).validate();
    console.log(`ok ${name}`);
  } catch (err) {
    console.log(`error ${name}: ${err.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
