// Echo actors on the unmodified `@rivetkit/engine-runner` package, for interop tests.
//
// Usage: node engine_runner_echo.mjs <endpoint>          (e.g. http://127.0.0.1:6420)
//   ENGINE_RUNNER_TOKEN   the admin token, passed to the package as its `token` option
//
// Starts one `Runner` (namespace "default", runner name "default", a fresh random runner key
// chosen by the package itself, 10 slots) against the gateway at <endpoint>. Its actors:
//   - accept every WebSocket and send each message straight back with the same type (text stays
//     text, binary stays binary);
//   - a text message `__close__ <code> <reason…>` instead makes the actor close that socket
//     with that code and reason (runner-initiated close);
//   - answer every HTTP request with a JSON echo
//     `{"actorId","method","path","headers","body","bodyLength"}` (body decoded as UTF-8),
//     except `POST /kv`, which runs one actor KV operation through the package's own KV client
//     (see `kvCall`);
//   - declare sockets hibernatable (`canHibernate: true`) unless the request's query contains
//     `hibernatable=0`, keep the socket's metadata in memory, and acknowledge every received
//     message (`WebSocketMessageAck` with the message's index) right after echoing it; when
//     the same process starts the actor again, the sockets the gateway lists in
//     `hibernatingRequests` are restored from that memory.
//
// stdout carries one line per event, nothing else (parse with split on whitespace):
//   READY runner_id=<id>                      after every `ToClient::Init` (first and reconnects)
//   DISCONNECTED code=<code> reason=<reason>  the runner connection closed
//   ACTOR_STARTED <actorId> generation=<n>
//   ACTOR_STOPPED <actorId> generation=<n>
//   WS_OPEN <actorId> hibernatable=<bool> path=<path>
//   WS_RESTORED <actorId> hibernatable=<bool> path=<path>
//   WS_CLOSE <actorId> <code> <reason>
//   FATAL <message>                           then exit status 1
// Logs (the package's own logger calls, JSON lines) go to stderr, at the level given by
// `ENGINE_RUNNER_LOG` (trace|debug|info|warn|error|silent; default warn).
//
// Exit: SIGTERM or end of stdin → immediate shutdown (connection closed with 1000
// `pegboard.runner_shutdown`), exit 0. SIGINT → graceful drain (`ToServer::Stopping`, wait for
// the gateway to stop the actors, then close), exit 0. Keep stdin open while the runner should
// live.

import { Runner } from "@rivetkit/engine-runner";

const endpoint = process.argv[2];
if (!endpoint) {
  process.stderr.write("usage: node engine_runner_echo.mjs <endpoint>\n");
  process.exit(2);
}

// ---- stdout event lines and stderr logger ----------------------------------------------------

function emit(line) {
  process.stdout.write(`${line}\n`);
}

function fatal(what, err) {
  const msg = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  process.stderr.write(`${what}: ${err instanceof Error ? err.stack : msg}\n`);
  emit(`FATAL ${what}: ${msg.replace(/\s+/g, " ")}`);
  process.exit(1);
}

process.on("uncaughtException", (err) => fatal("uncaught exception", err));
process.on("unhandledRejection", (err) => fatal("unhandled rejection", err));

const LEVELS = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60 };
const minLevel = (() => {
  const want = (process.env.ENGINE_RUNNER_LOG || "warn").toLowerCase();
  if (want === "silent") return Infinity;
  return LEVELS[want] ?? LEVELS.warn;
})();

function jsonSafe(_key, value) {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Error) return `${value.name}: ${value.message}`;
  if (value instanceof ArrayBuffer) return hex(value);
  if (ArrayBuffer.isView(value)) return `bytes(${value.byteLength})`;
  if (value instanceof Map) return Object.fromEntries(value);
  return value;
}

// The package calls `log.<level>(object)`, `log.<level>(string)` and `log.child(bindings)`.
function makeLogger(bindings) {
  const log = { level: Object.keys(LEVELS).find((k) => LEVELS[k] === minLevel) ?? "silent" };
  for (const [name, value] of Object.entries(LEVELS)) {
    log[name] = (obj, msg) => {
      if (value < minLevel) return;
      const record = { level: name, ...bindings };
      if (typeof obj === "string") record.msg = obj;
      else if (obj && typeof obj === "object") Object.assign(record, obj);
      if (typeof msg === "string") record.msg = msg;
      let text;
      try {
        text = JSON.stringify(record, jsonSafe);
      } catch {
        text = `{"level":"${name}","msg":"unserializable log record"}`;
      }
      process.stderr.write(`[engine-runner] ${text}\n`);
    };
  }
  log.child = (more) => makeLogger({ ...bindings, ...more });
  return log;
}

function hex(buf) {
  return Buffer.from(buf).toString("hex");
}

function oneLine(s) {
  return String(s ?? "").replace(/\s+/g, "_") || "-";
}

// ---- hibernatable socket metadata, kept for the life of this process --------------------------

/** actorId → Map(gatewayIdHex:requestIdHex → HibernatingWebSocketMetadata) */
const persisted = new Map();

function socketKey(gatewayId, requestId) {
  return `${hex(gatewayId)}:${hex(requestId)}`;
}

function persistedFor(actorId) {
  let m = persisted.get(actorId);
  if (!m) {
    m = new Map();
    persisted.set(actorId, m);
  }
  return m;
}

function wantsHibernation(request) {
  try {
    return new URL(request.url).searchParams.get("hibernatable") !== "0";
  } catch {
    return true;
  }
}

// ---- the runner ------------------------------------------------------------------------------

let runner;

function attachEcho(actorId, ws, gatewayId, requestId, path, headers, isHibernatable) {
  const key = socketKey(gatewayId, requestId);
  if (isHibernatable) {
    const store = persistedFor(actorId);
    if (!store.has(key)) {
      store.set(key, {
        gatewayId,
        requestId,
        clientMessageIndex: 0,
        serverMessageIndex: 0,
        path,
        headers,
      });
    }
  }

  ws.addEventListener("open", () => {
    emit(`WS_OPEN ${actorId} hibernatable=${isHibernatable} path=${oneLine(path)}`);
  });

  ws.addEventListener("message", (event) => {
    const data = event.data;
    if (typeof data === "string" && data.startsWith("__close__ ")) {
      const [, code, ...reason] = data.split(" ");
      ws.close(Number(code), reason.join(" "));
      return;
    }
    // Text arrives as a string, binary as a Buffer; send() keeps the type.
    ws.send(data);

    if (isHibernatable && typeof event.rivetMessageIndex === "number") {
      const meta = persisted.get(actorId)?.get(key);
      if (meta) {
        meta.serverMessageIndex = event.rivetMessageIndex;
        const pending = runner.getActor(actorId)?.getPendingRequest(gatewayId, requestId);
        if (pending) meta.clientMessageIndex = pending.clientMessageIndex;
      }
      runner.sendHibernatableWebSocketMessageAck(gatewayId, requestId, event.rivetMessageIndex);
    }
  });

  ws.addEventListener("close", (event) => {
    persisted.get(actorId)?.delete(key);
    emit(`WS_CLOSE ${actorId} ${event.code} ${oneLine(event.reason)}`);
  });
}

runner = new Runner({
  version: 1,
  endpoint,
  namespace: "default",
  runnerName: "default",
  totalSlots: 10,
  prepopulateActorNames: {},
  metadata: { runner: "engine_runner_echo" },
  logger: makeLogger({}),
  noAutoShutdown: true,
  // ENGINE_RUNNER_TOKEN, when set: offered as the `rivet_token.<token>` subprotocol.
  token: process.env.ENGINE_RUNNER_TOKEN || undefined,

  onConnected() {
    emit(`READY runner_id=${runner.runnerId}`);
  },
  onDisconnected(code, reason) {
    emit(`DISCONNECTED code=${code} reason=${oneLine(reason)}`);
  },
  onShutdown() {},

  async onActorStart(actorId, generation, _config) {
    emit(`ACTOR_STARTED ${actorId} generation=${generation}`);
    const metas = Array.from(persistedFor(actorId).values());
    await runner.restoreHibernatingRequests(actorId, metas);
  },
  async onActorStop(actorId, generation) {
    emit(`ACTOR_STOPPED ${actorId} generation=${generation}`);
  },

  async fetch(_runner, actorId, _gatewayId, _requestId, request) {
    const url = new URL(request.url);
    const body = Buffer.from(await request.arrayBuffer());
    if (url.pathname === "/kv") return kvCall(actorId, JSON.parse(body.toString("utf8")));
    const headers = {};
    request.headers.forEach((value, name) => {
      headers[name] = value;
    });
    return new Response(
      JSON.stringify({
        actorId,
        method: request.method,
        path: url.pathname + url.search,
        headers,
        body: body.toString("utf8"),
        bodyLength: body.length,
      }),
      { status: 200, headers: { "content-type": "application/json" } },
    );
  },

  async websocket(
    _runner,
    actorId,
    ws,
    gatewayId,
    requestId,
    _request,
    path,
    headers,
    isHibernatable,
    isRestoringHibernatable,
  ) {
    attachEcho(actorId, ws, gatewayId, requestId, path, headers, isHibernatable);
    if (isRestoringHibernatable) {
      emit(`WS_RESTORED ${actorId} hibernatable=${isHibernatable} path=${oneLine(path)}`);
    }
  },

  hibernatableWebSocket: {
    canHibernate(_actorId, _gatewayId, _requestId, request) {
      return wantsHibernation(request);
    },
  },
});

// ---- actor KV through the package's own client ----------------------------------------------

const bytes = (hex) => new Uint8Array(Buffer.from(hex, "hex"));
const hexOf = (b) => (b == null ? null : Buffer.from(b).toString("hex"));

// POST /kv with {"op": ..., ...}; keys and values are hex. Answers {"result": ...} or, when the
// gateway refused the request, status 500 with {"error": message}.
async function kvCall(actorId, c) {
  const opts = { reverse: c.reverse, limit: c.limit };
  const pairs = (list) => list.map(([k, v]) => [hexOf(k), hexOf(v)]);
  try {
    let result = null;
    switch (c.op) {
      case "put":
        await runner.kvPut(actorId, c.entries.map(([k, v]) => [bytes(k), bytes(v)]));
        break;
      case "get":
        result = (await runner.kvGet(actorId, c.keys.map(bytes))).map(hexOf);
        break;
      case "list_all":
        result = pairs(await runner.kvListAll(actorId, opts));
        break;
      case "list_prefix":
        result = pairs(await runner.kvListPrefix(actorId, bytes(c.prefix), opts));
        break;
      case "list_range":
        result = pairs(
          await runner.kvListRange(actorId, bytes(c.start), bytes(c.end), c.exclusive, opts),
        );
        break;
      case "delete":
        await runner.kvDelete(actorId, c.keys.map(bytes));
        break;
      case "delete_range":
        await runner.kvDeleteRange(actorId, bytes(c.start), bytes(c.end));
        break;
      case "drop":
        await runner.kvDrop(actorId);
        break;
      default:
        throw new Error(`unknown op ${c.op}`);
    }
    return Response.json({ result });
  } catch (err) {
    return Response.json({ error: String(err?.message ?? err) }, { status: 500 });
  }
}

// ---- lifecycle -------------------------------------------------------------------------------

let stopping = false;
async function stop(immediate) {
  if (stopping) return;
  stopping = true;
  try {
    await runner.shutdown(immediate, false);
  } catch (err) {
    process.stderr.write(`shutdown error: ${err}\n`);
  }
  process.exit(0);
}

process.on("SIGTERM", () => stop(true));
process.on("SIGINT", () => stop(false));
process.stdin.on("end", () => stop(true));
process.stdin.on("error", () => stop(true));
process.stdin.resume();

await runner.start();
