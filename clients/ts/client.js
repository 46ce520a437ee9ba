#!/usr/bin/env node
// @ts-check
// A weightsync client in JavaScript: reads WeightSync.GetStatus, then calls Generate.Generate.
//
//   node client.js [--max-tokens N] [--logprobs] [--timeout SECONDS] [--proto DIR] [--token-file FILE] ADDRESS PROMPT
//
// With --logprobs the request sets logprobs: true and the response carries one logprob per token id.
// With --token-file (or WEIGHTSYNC_AUTH_TOKEN), every call carries "authorization: Bearer <token>",
// for a rollout started with --auth-token-file (and --generate-token-file holding the same token).
// The stubs come from proto/ at runtime (@grpc/proto-loader), so nothing is generated or committed.
// Prints one JSON object in the protobuf JSON mapping with proto field names (uint64 as strings):
//   {"status": GetStatusResponse, "response": GenerateResponse}            exit 0
//   {"status": GetStatusResponse, "error": {"code", "name", "details", "reason", "domain"}}
//                                        exit 1 (e.g. UNAVAILABLE, reason NO_WEIGHTS, before the first commit)
// "reason" is the google.rpc.ErrorInfo the rollout puts in the status details (domain "weightsync.v1"):
// branch on it, never on "details" text.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    "max-tokens": { type: "string", default: "16" },
    timeout: { type: "string", default: "30" },
    proto: { type: "string", default: path.resolve(__dirname, "..", "..", "proto") },
    "token-file": { type: "string" },
    logprobs: { type: "boolean", default: false },
  },
});
if (positionals.length !== 2) {
  process.stderr.write(
    "usage: client.js [--max-tokens N] [--logprobs] [--timeout SECONDS] [--proto DIR] [--token-file FILE] ADDRESS PROMPT\n",
  );
  process.exit(2);
}
const [address, prompt] = positionals;
const token = flags["token-file"]
  ? fs.readFileSync(flags["token-file"], "utf8").trim()
  : process.env.WEIGHTSYNC_AUTH_TOKEN ?? "";
const metadata = new grpc.Metadata();
if (token) metadata.set("authorization", `Bearer ${token}`);

const definition = protoLoader.loadSync("weightsync/v1/weightsync.proto", {
  includeDirs: [flags.proto],
  keepCase: true, // proto field names, as the JSON mapping's "preserving proto field names" option
  longs: String, // uint64 as decimal strings, as in the protobuf JSON mapping
  enums: String,
  defaults: true,
  oneofs: true,
});
/** @type {any} */
const v1 = grpc.loadPackageDefinition(definition).weightsync.v1;
const credentials = grpc.credentials.createInsecure();
const weightSync = new v1.WeightSync(address, credentials);
const generate = new v1.Generate(address, credentials);

/**
 * Calls a unary method and resolves with its response.
 * @param {any} client
 * @param {string} method
 * @param {object} request
 * @returns {Promise<any>}
 */
function call(client, method, request) {
  const deadline = new Date(Date.now() + Number(flags.timeout) * 1000);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (/** @type {any} */ error, /** @type {any} */ response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

// google.rpc.Status and google.rpc.ErrorInfo, the two messages a rich error status carries.
const richStatus = protobuf.Root.fromJSON({
  nested: {
    Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
    Status: {
      fields: {
        code: { type: "int32", id: 1 },
        message: { type: "string", id: 2 },
        details: { rule: "repeated", type: "Any", id: 3 },
      },
    },
    ErrorInfo: {
      fields: {
        reason: { type: "string", id: 1 },
        domain: { type: "string", id: 2 },
        metadata: { keyType: "string", type: "string", id: 3 },
      },
    },
  },
});

/**
 * The ErrorInfo in a failed call's `grpc-status-details-bin` trailer, if any.
 * @param {any} error
 * @returns {{reason: string, domain: string} | null}
 */
function errorInfoOf(error) {
  const [raw] = error?.metadata?.get("grpc-status-details-bin") ?? [];
  if (!raw) return null;
  const status = /** @type {any} */ (richStatus.lookupType("Status").decode(raw));
  for (const detail of status.details) {
    if (detail.type_url.endsWith("/google.rpc.ErrorInfo")) {
      const info = /** @type {any} */ (richStatus.lookupType("ErrorInfo").decode(detail.value));
      return { reason: info.reason, domain: info.domain };
    }
  }
  return null;
}

/**
 * The gRPC status of a failed call, as {code, name, details, reason, domain}.
 * @param {any} error
 */
function statusOf(error) {
  if (typeof error?.code !== "number") throw error;
  const info = errorInfoOf(error) ?? { reason: "", domain: "" };
  return { code: error.code, name: grpc.status[error.code], details: error.details, ...info };
}

async function main() {
  /** @type {Record<string, unknown>} */
  const out = {};
  let exitCode = 0;
  try {
    out.status = await call(weightSync, "GetStatus", {});
    out.response = await call(generate, "Generate", {
      prompt,
      max_tokens: Number(flags["max-tokens"]),
      temperature: 0,
      logprobs: flags.logprobs,
    });
  } catch (error) {
    out.error = statusOf(error);
    exitCode = 1;
  } finally {
    weightSync.close();
    generate.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exitCode = exitCode;
}

main().catch((error) => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exitCode = 2;
});
