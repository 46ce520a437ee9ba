#!/usr/bin/env node
// @ts-check
// A weightsync client in JavaScript: reads WeightSync.GetStatus, then calls Generate.Generate.
//
//   node client.js [--max-tokens N] [--timeout SECONDS] [--proto DIR] [--token-file FILE] ADDRESS PROMPT
//
// With --token-file (or WEIGHTSYNC_AUTH_TOKEN), every call carries "authorization: Bearer <token>",
// for a rollout started with --auth-token-file (and --generate-token-file holding the same token).
// The stubs come from proto/ at runtime (@grpc/proto-loader), so nothing is generated or committed.
// Prints one JSON object in the protobuf JSON mapping with proto field names (uint64 as strings):
//   {"status": GetStatusResponse, "response": GenerateResponse}            exit 0
//   {"status": GetStatusResponse, "error": {"code", "name", "details"}}     exit 1 (e.g. UNAVAILABLE
//                                                                           before the first commit)
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    "max-tokens": { type: "string", default: "16" },
    timeout: { type: "string", default: "30" },
    proto: { type: "string", default: path.resolve(__dirname, "..", "..", "proto") },
    "token-file": { type: "string" },
  },
});
if (positionals.length !== 2) {
  process.stderr.write(
    "usage: client.js [--max-tokens N] [--timeout SECONDS] [--proto DIR] [--token-file FILE] ADDRESS PROMPT\n",
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

/**
 * The gRPC status of a failed call, as {code, name, details}.
 * @param {any} error
 */
function statusOf(error) {
  if (typeof error?.code !== "number") throw error;
  return { code: error.code, name: grpc.status[error.code], details: error.details };
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
