// Serves the rivetkit app (registry.mjs) in serverless mode: the unmodified `rivetkit@2.2.1`
// `registry.handler()` under `@hono/node-server`, on loopback. The engine (torpor) starts
// runners with `GET /api/rivet/start` (an SSE stream) and reads `GET /api/rivet/metadata`.
//
// Usage: node serverless.mjs
//   RIVET_ENDPOINT   the engine as runners reach it (required; rivetkit refuses a /start whose
//                    x-rivet-endpoint differs, and uses this to pick its engine driver)
//   RIVET_LOG_LEVEL  rivetkit's own log level (default warn)
//   APP_SLEEP_TIMEOUT_MS  see registry.mjs
//
// stdin commands (one per line): `fail <status>` answers every later /start with that status
// (before rivetkit sees it); `ok` hands /start to rivetkit again.
//
// stdout lines (besides registry.mjs's lifecycle lines):
//   LISTENING port=<port>
//   START endpoint=<x-rivet-endpoint> slots=<x-rivet-total-slots> runner=<x-rivet-runner-name>
//         namespace=<x-rivet-namespace-name> token=<yes|no> answer=<rivetkit|status>
//   START_END                                       a /start stream ended (torpor closed it)
//   FATAL <message>                                 then exit status 1

import { createInterface } from "node:readline";

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

if (!process.env.RIVET_ENDPOINT) {
  fatal("config", new Error("RIVET_ENDPOINT is not set"));
}
process.env.RIVET_LOG_LEVEL ??= "warn";

const { serve } = await import("@hono/node-server");
const { registry } = await import("./registry.mjs");

let failStatus = null;
createInterface({ input: process.stdin }).on("line", (line) => {
  const [cmd, arg] = line.trim().split(/\s+/);
  if (cmd === "fail") failStatus = Number(arg);
  else if (cmd === "ok") failStatus = null;
  emit(`CMD ${line.trim()}`);
});

serve(
  {
    hostname: "127.0.0.1",
    port: 0,
    fetch: async (req) => {
      const url = new URL(req.url);
      if (url.pathname === "/api/rivet/start") {
        const h = (n) => req.headers.get(n) ?? "";
        const answer = failStatus === null ? "rivetkit" : String(failStatus);
        emit(
          `START endpoint=${h("x-rivet-endpoint")} slots=${h("x-rivet-total-slots")} ` +
            `runner=${h("x-rivet-runner-name")} namespace=${h("x-rivet-namespace-name")} ` +
            `token=${req.headers.has("x-rivet-token") ? "yes" : "no"} answer=${answer}`,
        );
        if (failStatus !== null) {
          return new Response("start refused by the test", { status: failStatus });
        }
        req.signal.addEventListener("abort", () => emit("START_END"));
      }
      return registry.handler(req);
    },
  },
  (info) => emit(`LISTENING port=${info.port}`),
);
