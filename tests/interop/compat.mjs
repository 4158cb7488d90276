// Byte-compatibility oracle for torpor's runner protocol codec.
//
// Usage: node compat.mjs <input.json>
//
// Input:  {"entries": [{"dir": "toServer" | "toClient", "hex": "..."}]}
// Output (stdout, one JSON document):
//   {"decoded": [{"ok": true, "hex": <TS re-encoding>, "value": <normalized value>}
//                | {"ok": false, "error": "..."}],
//    "tsCorpus": [{"dir": ..., "hex": <TS encoding>, "value": <normalized value>}]}
//
// "Normalized value" is the TS decoder's value rewritten into the JSON shape that serde_json
// gives torpor's Rust types: unions become {"Member": val} (or "Member" when void), field
// names become snake_case, data becomes an array of byte values, maps become objects, and
// 64-bit integers are written as exact JSON integers.

import { readFileSync } from "node:fs";
import * as P from "@rivetkit/engine-runner-protocol";

const TAGS = {
  ToServerInit: "Init",
  ToServerEvents: "Events",
  ToServerAckCommands: "AckCommands",
  ToServerStopping: "Stopping",
  ToServerPong: "Pong",
  ToServerKvRequest: "KvRequest",
  ToServerTunnelMessage: "TunnelMessage",
  ToClientInit: "Init",
  ToClientCommands: "Commands",
  ToClientAckEvents: "AckEvents",
  ToClientKvResponse: "KvResponse",
  ToClientTunnelMessage: "TunnelMessage",
  ToClientPing: "Ping",
  KvListAllQuery: "All",
  KvListRangeQuery: "Range",
  KvListPrefixQuery: "Prefix",
  KvGetRequest: "Get",
  KvListRequest: "List",
  KvPutRequest: "Put",
  KvDeleteRequest: "Delete",
  KvDeleteRangeRequest: "DeleteRange",
  KvDropRequest: "Drop",
  KvErrorResponse: "Error",
  KvGetResponse: "Get",
  KvListResponse: "List",
  KvPutResponse: "Put",
  KvDeleteResponse: "Delete",
  KvDropResponse: "Drop",
  ActorIntentSleep: "Sleep",
  ActorIntentStop: "Stop",
  ActorStateRunning: "Running",
  ActorStateStopped: "Stopped",
  EventActorIntent: "ActorIntent",
  EventActorStateUpdate: "ActorStateUpdate",
  EventActorSetAlarm: "ActorSetAlarm",
  CommandStartActor: "StartActor",
  CommandStopActor: "StopActor",
  ToClientRequestStart: "RequestStart",
  ToClientRequestChunk: "RequestChunk",
  ToClientRequestAbort: "RequestAbort",
  ToClientWebSocketOpen: "WebSocketOpen",
  ToClientWebSocketMessage: "WebSocketMessage",
  ToClientWebSocketClose: "WebSocketClose",
  ToServerResponseStart: "ResponseStart",
  ToServerResponseChunk: "ResponseChunk",
  ToServerResponseAbort: "ResponseAbort",
  ToServerWebSocketOpen: "WebSocketOpen",
  ToServerWebSocketMessage: "WebSocketMessage",
  ToServerWebSocketMessageAck: "WebSocketMessageAck",
  ToServerWebSocketClose: "WebSocketClose",
};

const snake = (k) => k.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase());

function bytesJson(u8) {
  let s = "[";
  for (let i = 0; i < u8.length; i++) {
    if (i) s += ",";
    s += u8[i];
  }
  return s + "]";
}

function isUnion(v) {
  const keys = Object.keys(v);
  return keys.length === 2 && keys[0] === "tag" && keys[1] === "val";
}

// Renders a decoded TS value as JSON text in serde_json's shape for the Rust types.
function norm(v) {
  if (v === null || v === undefined) return "null";
  switch (typeof v) {
    case "bigint":
      return v.toString();
    case "number":
      if (!Number.isInteger(v)) throw new Error(`non-integer number ${v}`);
      return String(v);
    case "boolean":
      return v ? "true" : "false";
    case "string":
      return JSON.stringify(v);
  }
  if (v instanceof ArrayBuffer) return bytesJson(new Uint8Array(v));
  if (ArrayBuffer.isView(v)) return bytesJson(new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
  if (Array.isArray(v)) return "[" + v.map(norm).join(",") + "]";
  if (v instanceof Map) {
    const parts = [];
    for (const [k, x] of v) parts.push(JSON.stringify(k) + ":" + norm(x));
    return "{" + parts.join(",") + "}";
  }
  if (isUnion(v)) {
    const name = TAGS[v.tag];
    if (name === undefined) throw new Error(`unmapped union tag ${v.tag}`);
    if (v.val === null) return JSON.stringify(name);
    return "{" + JSON.stringify(name) + ":" + norm(v.val) + "}";
  }
  const parts = [];
  for (const [k, x] of Object.entries(v)) parts.push(JSON.stringify(snake(k)) + ":" + norm(x));
  return "{" + parts.join(",") + "}";
}

const hex = (u8) => Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

const codecs = {
  toServer: [P.decodeToServer, P.encodeToServer],
  toClient: [P.decodeToClient, P.encodeToClient],
};

// ------------------------------------------------------------------------------------------
// TS-encoded corpus: every member of every union, extremes, long and non-ASCII strings.
// ------------------------------------------------------------------------------------------

const buf = (...xs) => new Uint8Array(xs).buffer;
const fill = (n, b) => new Uint8Array(n).fill(b).buffer;
const U64_MAX = 2n ** 64n - 1n;
const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;
const LONG = "x".repeat(70000);
const UNI = "héllo wörld ✓ 🚀 " + "ü".repeat(200);
const gw = buf(0xde, 0xad, 0xbe, 0xef);
const rq = buf(0, 0, 0, 1);
const mid = (i) => ({ gatewayId: gw, requestId: rq, messageIndex: i });
const cp = (id, g, i) => ({ actorId: id, generation: g, index: i });
const headers = new Map([
  ["content-type", "text/plain"],
  ["x-b", ""],
  ["", "empty key"],
  ["x-unicode", UNI],
]);
const u = (tag, val = null) => ({ tag, val });

function serverCorpus() {
  const kv = (data) =>
    u("ToServerKvRequest", { actorId: "actor-1", requestId: 4294967295, data });
  const tun = (i, kind) => u("ToServerTunnelMessage", { messageId: mid(i), messageKind: kind });
  return [
    u("ToServerInit", {
      name: "default",
      version: 1,
      totalSlots: 100000,
      prepopulateActorNames: null,
      metadata: null,
    }),
    u("ToServerInit", {
      name: LONG,
      version: 4294967295,
      totalSlots: 0,
      prepopulateActorNames: new Map([
        ["counter", { metadata: "{}" }],
        ["chat", { metadata: JSON.stringify({ unicode: UNI }) }],
      ]),
      metadata: "{\"a\":1}",
    }),
    u("ToServerInit", {
      name: "",
      version: 0,
      totalSlots: 1,
      prepopulateActorNames: new Map(),
      metadata: "",
    }),
    u("ToServerEvents", []),
    u("ToServerEvents", [
      { checkpoint: cp("a", 0, 0n), inner: u("EventActorIntent", { intent: u("ActorIntentSleep") }) },
      { checkpoint: cp("a", 1, 1n), inner: u("EventActorIntent", { intent: u("ActorIntentStop") }) },
      { checkpoint: cp("b", 4294967295, I64_MAX), inner: u("EventActorStateUpdate", { state: u("ActorStateRunning") }) },
      {
        checkpoint: cp("b", 2, I64_MIN),
        inner: u("EventActorStateUpdate", {
          state: u("ActorStateStopped", { code: P.StopCode.Ok, message: null }),
        }),
      },
      {
        checkpoint: cp("b", 2, -1n),
        inner: u("EventActorStateUpdate", {
          state: u("ActorStateStopped", { code: P.StopCode.Error, message: UNI }),
        }),
      },
      { checkpoint: cp("c", 3, 5n), inner: u("EventActorSetAlarm", { alarmTs: null }) },
      { checkpoint: cp("c", 3, 6n), inner: u("EventActorSetAlarm", { alarmTs: 1700000000000n }) },
      { checkpoint: cp("c", 3, 7n), inner: u("EventActorSetAlarm", { alarmTs: I64_MIN }) },
    ]),
    u("ToServerAckCommands", { lastCommandCheckpoints: [] }),
    u("ToServerAckCommands", { lastCommandCheckpoints: [cp("x", 1, 2n), cp("y", 3, 4n)] }),
    u("ToServerStopping"),
    u("ToServerPong", { ts: I64_MIN }),
    u("ToServerPong", { ts: I64_MAX }),
    kv(u("KvGetRequest", { keys: [] })),
    kv(u("KvGetRequest", { keys: [buf(), buf(1, 2, 3), fill(2048, 0xff)] })),
    kv(u("KvListRequest", { query: u("KvListAllQuery"), reverse: null, limit: null })),
    kv(
      u("KvListRequest", {
        query: u("KvListRangeQuery", { start: buf(0), end: buf(0xff, 0xff), exclusive: true }),
        reverse: true,
        limit: U64_MAX,
      }),
    ),
    kv(
      u("KvListRequest", {
        query: u("KvListRangeQuery", { start: buf(), end: buf(), exclusive: false }),
        reverse: false,
        limit: 0n,
      }),
    ),
    kv(u("KvListRequest", { query: u("KvListPrefixQuery", { key: buf(7) }), reverse: null, limit: 16384n })),
    kv(u("KvPutRequest", { keys: [buf(1), buf(2)], values: [fill(70000, 0xab), buf()] })),
    kv(u("KvDeleteRequest", { keys: [buf(9)] })),
    kv(u("KvDeleteRangeRequest", { start: buf(1), end: buf(2) })),
    kv(u("KvDropRequest")),
    tun(0, u("ToServerResponseStart", { status: 200, headers, body: buf(104, 105), stream: false })),
    tun(65535, u("ToServerResponseStart", { status: 65535, headers: new Map(), body: null, stream: true })),
    tun(1, u("ToServerResponseStart", { status: 204, headers: new Map(), body: buf(), stream: false })),
    tun(2, u("ToServerResponseChunk", { body: fill(70000, 1), finish: false })),
    tun(3, u("ToServerResponseChunk", { body: buf(), finish: true })),
    tun(4, u("ToServerResponseAbort")),
    tun(5, u("ToServerWebSocketOpen", { canHibernate: true })),
    tun(6, u("ToServerWebSocketOpen", { canHibernate: false })),
    tun(7, u("ToServerWebSocketMessage", { data: buf(), binary: true })),
    tun(8, u("ToServerWebSocketMessage", { data: fill(16384, 0x41), binary: false })),
    tun(9, u("ToServerWebSocketMessageAck", { index: 65535 })),
    tun(10, u("ToServerWebSocketClose", { code: 1000, reason: "bye", hibernate: false })),
    tun(11, u("ToServerWebSocketClose", { code: null, reason: null, hibernate: true })),
    tun(12, u("ToServerWebSocketClose", { code: 65535, reason: "", hibernate: false })),
  ];
}

function clientCorpus() {
  const kv = (data) => u("ToClientKvResponse", { requestId: 0, data });
  const tun = (i, kind) => u("ToClientTunnelMessage", { messageId: mid(i), messageKind: kind });
  const meta = { version: buf(1, 2), updateTs: I64_MAX };
  return [
    u("ToClientInit", {
      runnerId: "runner-1",
      metadata: { runnerLostThreshold: 15000n, actorStopThreshold: 30000n, serverlessDrainGracePeriod: null },
    }),
    u("ToClientInit", {
      runnerId: LONG,
      metadata: { runnerLostThreshold: I64_MIN, actorStopThreshold: I64_MAX, serverlessDrainGracePeriod: 0n },
    }),
    u("ToClientCommands", []),
    u("ToClientCommands", [
      {
        checkpoint: cp("a", 1, 0n),
        inner: u("CommandStartActor", {
          config: { name: "counter", key: "k1", createTs: 1700000000000n, input: fill(300, 9) },
          hibernatingRequests: [
            { gatewayId: gw, requestId: rq },
            { gatewayId: buf(1, 1, 1, 1), requestId: buf(2, 2, 2, 2) },
          ],
        }),
      },
      {
        checkpoint: cp("b", 4294967295, I64_MAX),
        inner: u("CommandStartActor", {
          config: { name: "", key: null, createTs: I64_MIN, input: null },
          hibernatingRequests: [],
        }),
      },
      { checkpoint: cp("a", 1, 1n), inner: u("CommandStopActor") },
    ]),
    u("ToClientAckEvents", { lastEventCheckpoints: [] }),
    u("ToClientAckEvents", { lastEventCheckpoints: [cp("a", 1, 3n), cp(UNI, 2, 0n)] }),
    kv(u("KvErrorResponse", { message: "value too large (limit 131072)" })),
    kv(u("KvGetResponse", { keys: [buf(1)], values: [fill(70000, 2)], metadata: [meta] })),
    kv(u("KvGetResponse", { keys: [], values: [], metadata: [] })),
    kv(u("KvListResponse", { keys: [buf(1), buf(2)], values: [buf(), buf(3)], metadata: [meta, { version: buf(), updateTs: 0n }] })),
    kv(u("KvPutResponse")),
    kv(u("KvDeleteResponse")),
    kv(u("KvDropResponse")),
    tun(0, u("ToClientRequestStart", { actorId: "act", method: "POST", path: "/a?b=c", headers, body: buf(1), stream: false })),
    tun(1, u("ToClientRequestStart", { actorId: "", method: "", path: "", headers: new Map(), body: null, stream: true })),
    tun(2, u("ToClientRequestChunk", { body: fill(70000, 3), finish: true })),
    tun(3, u("ToClientRequestChunk", { body: buf(), finish: false })),
    tun(4, u("ToClientRequestAbort")),
    tun(5, u("ToClientWebSocketOpen", { actorId: "act", path: "/ws", headers })),
    tun(6, u("ToClientWebSocketOpen", { actorId: "act", path: "/", headers: new Map() })),
    tun(7, u("ToClientWebSocketMessage", { data: buf(), binary: false })),
    tun(65535, u("ToClientWebSocketMessage", { data: fill(1 << 20, 0x5a), binary: true })),
    tun(8, u("ToClientWebSocketClose", { code: 1011, reason: "ws.eviction" })),
    tun(9, u("ToClientWebSocketClose", { code: null, reason: null })),
    u("ToClientPing", { ts: 0n }),
    u("ToClientPing", { ts: I64_MIN }),
  ];
}

// ------------------------------------------------------------------------------------------

const input = JSON.parse(readFileSync(process.argv[2], "utf8"));

// Values are spliced in as raw JSON text so that 64-bit integers stay exact.
const out = ['{"decoded":['];
input.entries.forEach(({ dir, hex: h }, i) => {
  if (i) out.push(",");
  const [decode, encode] = codecs[dir];
  let v;
  try {
    v = decode(unhex(h));
  } catch (e) {
    out.push(JSON.stringify({ ok: false, error: String(e && e.message ? e.message : e) }));
    return;
  }
  out.push(`{"ok":true,"hex":"${hex(encode(v))}","value":${norm(v)}}`);
});
out.push('],"tsCorpus":[');
let first = true;
for (const [dir, values] of [
  ["toServer", serverCorpus()],
  ["toClient", clientCorpus()],
]) {
  const [decode, encode] = codecs[dir];
  for (const v of values) {
    const bytes = encode(v);
    const rendered = norm(v);
    // The constructed value must survive the TS round trip unchanged.
    const again = norm(decode(bytes));
    if (again !== rendered) throw new Error(`TS round trip changed a ${dir} value: ${rendered.slice(0, 200)}`);
    if (!first) out.push(",");
    first = false;
    out.push(`{"dir":"${dir}","hex":"${hex(bytes)}","value":${rendered}}`);
  }
}
out.push("]}");
process.stdout.write(out.join(""));
