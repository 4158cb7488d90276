// Serves the rivetkit app (registry.mjs) in serverless mode: the unmodified `rivetkit@2.2.1`
// `registry.handler()` under `@hono/node-server`, on loopback. The engine (torpor) starts
// runners with `GET /api/rivet/start` (an SSE stream) and reads `GET /api/rivet/metadata`.
//
// Usage: node serverless.mjs
//   RIVET_ENDPOINT   the engine as runners reach it (required; rivetkit refuses a /start whose
//                    x-rivet-endpoint differs, and uses this to pick its engine driver)
//   RIVET_LOG_LEVEL  rivetkit's own log level (default warn)
//   APP_SLEEP_TIMEOUT_MS  see registry.mjs
//   APP_PORT         the port to listen on (default 0: an ephemeral one)
//   APP_CONFIGURE_POOL  set to `1`: the app configures its own pool, as `@rivetkit/next-js`
//                    does in development: the registry gets rivetkit's
//                    `serverless.configureRunnerPool` option pointing at the app's own URL
//                    (`http://127.0.0.1:<port>/api/rivet`, runner `default`, 10 slots, at most
//                    4 runners), and the app sends itself one request once it listens
//                    (rivetkit puts the config on the registry's first handled request)
//
// stdin commands (one per line): `fail <status>` answers every later /start with that status
// (before rivetkit sees it); `ok` hands /start to rivetkit again.
//
// stdout lines (besides registry.mjs's lifecycle lines):
//   LISTENING port=<port>
//   START endpoint=<x-rivet-endpoint> slots=<x-rivet-total-slots> runner=<x-rivet-runner-name>
//         namespace=<x-rivet-namespace-name> token=<yes|no> answer=<rivetkit|status>
//   START_END                                       a /start stream ended (torpor closed it)
//   POOL_PUT status=<status>                        (APP_CONFIGURE_POOL=1) rivetkit's
//                                                   `PUT /runner-configs/{name}` was answered
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
const { counter, registry: plainRegistry } = await import("./registry.mjs");
const configurePool = process.env.APP_CONFIGURE_POOL === "1";
const rivetkit = configurePool ? await import("rivetkit") : null;

// With APP_CONFIGURE_POOL=1 the registry is made once the port (part of its own URL) is known.
let setRegistry;
const registryReady = configurePool
  ? new Promise((resolve) => (setRegistry = resolve))
  : Promise.resolve(plainRegistry);

if (configurePool) {
  // Reports when rivetkit's own PUT /runner-configs/{name} is answered (it uses the global
  // fetch and does not wait for it anywhere the app can see).
  const realFetch = globalThis.fetch;
  globalThis.fetch = async (input, init) => {
    const method = init?.method ?? (input instanceof Request ? input.method : "GET");
    const url = input instanceof Request ? input.url : String(input);
    const put = method === "PUT" && new URL(url).pathname.startsWith("/runner-configs/");
    const res = await realFetch(input, init);
    if (put) emit(`POOL_PUT status=${res.status}`);
    return res;
  };
}

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
    port: Number(process.env.APP_PORT ?? "0"),
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
      return (await registryReady).handler(req);
    },
  },
  (info) => {
    if (configurePool) {
      const registry = rivetkit.setup({
        use: { counter },
        noWelcome: true,
        serverless: {
          configureRunnerPool: {
            url: `http://127.0.0.1:${info.port}/api/rivet`,
            slotsPerRunner: 10,
            maxRunners: 4,
          },
        },
      });
      setRegistry(registry);
      // The first request the registry handles starts it in serverless mode, which puts the
      // runner config.
      fetch(`http://127.0.0.1:${info.port}/api/rivet/metadata`).catch((e) =>
        fatal("self request", e),
      );
    }
    emit(`LISTENING port=${info.port}`);
  },
);
