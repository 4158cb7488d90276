// The client side of the rivetkit interop tests: the unmodified `rivetkit@2.2.1` client
// (`createClient` from "rivetkit/client"), driven by commands on stdin, one per line, so that a
// test can keep client connections open while it kills and restarts the gateway or the runner.
//
// Usage: node rivetkit_client.mjs <endpoint>        (e.g. http://127.0.0.1:6420)
//   DRIVER_ENCODING   the client's encoding: bare (rivetkit's default) | json | cbor
//   RIVET_LOG_LEVEL   rivetkit's own log level (default warn; logs go to stdout as logfmt)
//
// Commands (`<tag>` is any word without spaces, echoed in the answer; JSON never spans lines):
//   <tag> resolve <key>                        actor id of counter[<key>] (getOrCreate)
//   <tag> get_resolve <key>                    actor id of counter[<key>] if it exists (get)
//   <tag> action <key> <name> <json args>      stateless action over HTTP (POST /gateway/…/action/…)
//   <tag> connect <conn> <key>                 opens a connection (WebSocket /connect); answers
//                                              once it is open (rivetkit's Init received)
//   <tag> conn_action <conn> <name> <json args>        action over that connection's WebSocket
//   <tag> conn_batch <conn> <name> <json [args, …]>    sends every call at once without waiting,
//                                              then answers with all results, in order
//   <tag> conn_status <conn>                   {"status","opens","closes"}
//   <tag> dispose <conn>
//   <tag> raw_open <ws> <key> <path>           raw WebSocket (handle.webSocket(path)); answers once open
//   <tag> raw_send <ws> <text>                 rest of the line is the text message
//   <tag> raw_recv <ws>                        next message received on <ws> (waits for it)
//   <tag> raw_status <ws>                      {"readyState","closes","received"}
//   <tag> raw_close <ws>
//   <tag> exit
//
// Answers (stdout, exactly one per command):
//   RES <tag> ok <json>
//   RES <tag> err <group>.<code> <message on one line>
// Unsolicited lines:
//   CONN_OPEN <conn> / CONN_CLOSE <conn>       every open / close of a connection's socket
//   CONN_STATUS <conn> <status>                idle | connecting | connected | disconnected
//   CONN_ERROR <conn> <group>.<code> <message> an error the connection reported
//   CONN_EVENT <conn> <name> <json>            an event broadcast by the actor
//   RAW_CLOSE <ws> <code> <reason>
//   READY                                      commands are accepted from now on
//   FATAL <message>                            then exit status 1

import { createInterface } from "node:readline";
import { createClient } from "rivetkit/client";

const endpoint = process.argv[2];
if (!endpoint) {
  process.stderr.write("usage: node rivetkit_client.mjs <endpoint>\n");
  process.exit(2);
}
process.env.RIVET_LOG_LEVEL ??= "warn";

function emit(line) {
  process.stdout.write(`${line}\n`);
}

function oneLine(s) {
  return String(s ?? "").replace(/\s+/g, " ").trim();
}

function fatal(what, err) {
  const msg = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  process.stderr.write(`${what}: ${err instanceof Error ? err.stack : msg}\n`);
  emit(`FATAL ${what}: ${oneLine(msg)}`);
  process.exit(1);
}

process.on("uncaughtException", (err) => fatal("uncaught exception", err));
// A rejected action promise whose command already answered must not kill the driver.
process.on("unhandledRejection", (err) => {
  process.stderr.write(`unhandled rejection: ${err instanceof Error ? err.stack : err}\n`);
});

const client = createClient({
  endpoint,
  encoding: process.env.DRIVER_ENCODING || "bare",
});

const handle = (key) => client.counter.getOrCreate([key]);

/** conn name → { conn, opens, closes, opened: Promise } */
const conns = new Map();
/** ws name → { ws, closes, received: string[], waiters: resolve[] } */
const raws = new Map();

function stringify(v) {
  return JSON.stringify(v ?? null, (_k, x) => (typeof x === "bigint" ? x.toString() : x));
}

function errorCode(err) {
  if (err && typeof err === "object" && "group" in err && "code" in err) {
    return `${err.group}.${err.code}`;
  }
  return `js.${err?.name ?? "Error"}`;
}

function need(map, name, what) {
  const v = map.get(name);
  if (!v) throw Object.assign(new Error(`no ${what} named ${name}`), { group: "driver", code: "unknown_name" });
  return v;
}

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw Object.assign(new Error(`bad JSON for ${what}: ${text}`), { group: "driver", code: "bad_json" });
  }
}

async function textOf(data) {
  if (typeof data === "string") return data;
  if (data instanceof ArrayBuffer) return Buffer.from(data).toString("utf8");
  if (ArrayBuffer.isView(data)) return Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("utf8");
  if (data && typeof data.text === "function") return await data.text();
  return String(data);
}

const commands = {
  async resolve([key]) {
    return await handle(key).resolve();
  },

  async get_resolve([key]) {
    return await client.counter.get([key]).resolve();
  },

  async action([key, name], rest) {
    const args = parseJson(rest, "args");
    return await handle(key).action({ name, args });
  },

  async connect([name, key]) {
    if (conns.has(name)) throw Object.assign(new Error(`conn ${name} exists`), { group: "driver", code: "exists" });
    const conn = handle(key).connect();
    const entry = { conn, opens: 0, closes: 0 };
    let firstOpen;
    const opened = new Promise((r) => (firstOpen = r));
    conn.onOpen(() => {
      entry.opens += 1;
      emit(`CONN_OPEN ${name}`);
      firstOpen();
    });
    conn.onClose(() => {
      entry.closes += 1;
      emit(`CONN_CLOSE ${name}`);
    });
    conn.onStatusChange((status) => emit(`CONN_STATUS ${name} ${status}`));
    conn.onError((err) => emit(`CONN_ERROR ${name} ${errorCode(err)} ${oneLine(err?.message ?? err)}`));
    conn.on("appended", (ev) => emit(`CONN_EVENT ${name} appended ${stringify(ev)}`));
    conns.set(name, entry);
    await opened;
    return { opens: entry.opens };
  },

  async conn_action([name, action], rest) {
    const { conn } = need(conns, name, "conn");
    return await conn.action({ name: action, args: parseJson(rest, "args") });
  },

  async conn_batch([name, action], rest) {
    const { conn } = need(conns, name, "conn");
    const calls = parseJson(rest, "batch");
    const pending = calls.map((args) => conn.action({ name: action, args }));
    const out = [];
    for (const p of pending) out.push(await p);
    return out;
  },

  async conn_status([name]) {
    const e = need(conns, name, "conn");
    return { status: e.conn.connStatus, opens: e.opens, closes: e.closes };
  },

  async dispose([name]) {
    const e = need(conns, name, "conn");
    conns.delete(name);
    await e.conn.dispose();
    return true;
  },

  async raw_open([name, key, path]) {
    if (raws.has(name)) throw Object.assign(new Error(`ws ${name} exists`), { group: "driver", code: "exists" });
    const ws = await handle(key).webSocket(path);
    const entry = { ws, closes: 0, received: [], waiters: [] };
    raws.set(name, entry);
    ws.addEventListener("message", async (event) => {
      const text = await textOf(event.data);
      const w = entry.waiters.shift();
      if (w) w(text);
      else entry.received.push(text);
    });
    ws.addEventListener("close", (event) => {
      entry.closes += 1;
      emit(`RAW_CLOSE ${name} ${event.code} ${oneLine(event.reason)}`);
    });
    if (ws.readyState !== 1) {
      await new Promise((resolve, reject) => {
        ws.addEventListener("open", () => resolve());
        ws.addEventListener("close", (e) =>
          reject(Object.assign(new Error(`closed before open: ${e.code} ${e.reason}`), { group: "ws", code: "closed_before_open" })),
        );
        // Node 22's WebSocket reports a refused upgrade (non-101 answer) with `error` only.
        ws.addEventListener("error", (e) =>
          reject(Object.assign(new Error(`error before open: ${e?.message ?? "unknown"}`), { group: "ws", code: "error_before_open" })),
        );
      });
    }
    return { readyState: ws.readyState };
  },

  async raw_send([name], rest) {
    const { ws } = need(raws, name, "ws");
    ws.send(rest);
    return true;
  },

  async raw_recv([name]) {
    const e = need(raws, name, "ws");
    if (e.received.length > 0) return e.received.shift();
    return await new Promise((r) => e.waiters.push(r));
  },

  async raw_status([name]) {
    const e = need(raws, name, "ws");
    return { readyState: e.ws.readyState, closes: e.closes, received: e.received.length };
  },

  async raw_close([name]) {
    const e = need(raws, name, "ws");
    e.ws.close(1000, "bye");
    return true;
  },

  async exit() {
    setImmediate(() => process.exit(0));
    return true;
  },
};

// How many leading words each command takes before its free-form rest (JSON or text).
const ARITY = {
  resolve: 1,
  get_resolve: 1,
  action: 2,
  connect: 2,
  conn_action: 2,
  conn_batch: 2,
  conn_status: 1,
  dispose: 1,
  raw_open: 3,
  raw_send: 1,
  raw_recv: 1,
  raw_status: 1,
  raw_close: 1,
  exit: 0,
};

function splitWords(line, n) {
  const words = [];
  let rest = line;
  for (let i = 0; i < n; i++) {
    rest = rest.replace(/^\s+/, "");
    const m = /^(\S+)/.exec(rest);
    if (!m) break;
    words.push(m[1]);
    rest = rest.slice(m[1].length);
  }
  return [words, rest.replace(/^\s/, "")];
}

async function run(line) {
  const [[tag, cmd], afterCmd] = splitWords(line, 2);
  if (!tag) return;
  const fn = commands[cmd];
  if (!fn) {
    emit(`RES ${tag} err driver.unknown_command ${oneLine(cmd)}`);
    return;
  }
  const [words, rest] = splitWords(afterCmd, ARITY[cmd]);
  try {
    const out = await fn(words, rest);
    emit(`RES ${tag} ok ${stringify(out)}`);
  } catch (err) {
    emit(`RES ${tag} err ${errorCode(err)} ${oneLine(err?.message ?? err)}`);
  }
}

const rl = createInterface({ input: process.stdin });
// Commands run concurrently: a test may wait on one (e.g. raw_recv) while issuing others.
rl.on("line", (line) => {
  run(line);
});
rl.on("close", () => process.exit(0));
emit("READY");
