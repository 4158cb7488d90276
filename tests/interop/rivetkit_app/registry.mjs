// The rivetkit app used by the interop tests: one actor definition on the unmodified
// `rivetkit@2.2.1` package.
//
// Actor `counter` (key = any string):
//   state       { count: number, log: string[], sleeps: number }
//   actions     increment(by = 1) -> new count      (state saved to KV before the reply)
//               get() -> count
//               append(item) -> log length           (state saved to KV before the reply)
//               log() -> log
//               goToSleep() -> true                  (saves, then asks the gateway to sleep the
//                                                     actor; see the note at the action)
//               whoami() -> { actorId, pid, wakes }
//   events      "appended" { item, length }          broadcast after every append
//   raw WebSocket (`handle.webSocket(path)`, actor path /websocket/…): declared hibernatable;
//               every text message `m` is appended to the log and answered with
//               `echo:<m>:<log length>` on the same socket.
//   sleep       after APP_SLEEP_TIMEOUT_MS (default 2000) without requests and without open
//               connections (rivetkit 2.2.1 never sleeps an actor that has a connection open,
//               hibernatable or not — see tests/interop/rivetkit_notes.md).
//
// Lifecycle lines go to stdout through `emit` (see runner.mjs for the line format).

import { actor, setup } from "rivetkit";

export function emit(line) {
  process.stdout.write(`${line}\n`);
}

const sleepTimeout = Number(process.env.APP_SLEEP_TIMEOUT_MS ?? "2000");

// Incremented on every start of any actor in this process; reported by `whoami`.
let wakes = 0;

async function persist(c) {
  // rivetkit saves state on a 1 s throttle after an action returns; saving before the reply
  // makes every acknowledged change durable in the gateway's KV store.
  await c.saveState({ immediate: true });
}

export const counter = actor({
  state: { count: 0, log: [], sleeps: 0 },
  options: {
    sleepTimeout,
    canHibernateWebSocket: true,
  },
  onWake: (c) => {
    wakes += 1;
    emit(`ACTOR_WAKE ${c.actorId} count=${c.state.count} log=${c.state.log.length}`);
  },
  onSleep: (c) => {
    emit(`ACTOR_SLEEP ${c.actorId} count=${c.state.count} log=${c.state.log.length}`);
  },
  onConnect: (c, conn) => {
    emit(`CONN_CONNECT ${c.actorId} ${conn.id} hibernatable=${conn.isHibernatable}`);
  },
  onDisconnect: (c, conn) => {
    emit(`CONN_DISCONNECT ${c.actorId} ${conn.id} hibernatable=${conn.isHibernatable}`);
  },
  actions: {
    increment: async (c, by = 1) => {
      c.state.count += by;
      await persist(c);
      return c.state.count;
    },
    get: (c) => c.state.count,
    append: async (c, item) => {
      c.state.log.push(String(item));
      await persist(c);
      c.broadcast("appended", { item: String(item), length: c.state.log.length });
      return c.state.log.length;
    },
    log: (c) => c.state.log,
    goToSleep: async (c) => {
      emit(`ACTOR_SLEEP_REQUESTED ${c.actorId}`);
      // rivetkit 2.2.1 acknowledges a hibernatable connection's messages only once it has
      // saved the connection's message index, and its save at stop skips the connections
      // when the actor state did not change (`saveState` checks only the state). Messages
      // processed since the last save would then be delivered again after the wake (this
      // very action too: the actor would go back to sleep). Changing the state and saving
      // before sleeping persists and acknowledges everything processed so far.
      c.state.sleeps = (c.state.sleeps ?? 0) + 1;
      await persist(c);
      c.sleep();
      return true;
    },
    whoami: (c) => ({ actorId: c.actorId, pid: process.pid, wakes }),
  },
  onWebSocket: (c, websocket) => {
    emit(`RAW_WS_OPEN ${c.actorId}`);
    websocket.addEventListener("message", async (event) => {
      const text = typeof event.data === "string" ? event.data : Buffer.from(event.data).toString("utf8");
      c.state.log.push(text);
      const length = c.state.log.length;
      await persist(c);
      websocket.send(`echo:${text}:${length}`);
    });
    websocket.addEventListener("close", (event) => {
      emit(`RAW_WS_CLOSE ${c.actorId} ${event.code}`);
    });
  },
});

export const registry = setup({
  use: { counter },
  noWelcome: true,
});
