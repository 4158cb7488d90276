// Runs the rivetkit app (registry.mjs) as a runner of an external engine (torpor), with the
// unmodified `rivetkit@2.2.1` engine driver.
//
// Usage: node runner.mjs            (configured by the environment, as rivetkit documents it)
//   RIVET_ENDPOINT      the engine, e.g. http://127.0.0.1:6420        (required)
//   RIVET_NAMESPACE     default "default"
//   RIVET_RUNNER        runner name, default "default"
//   RIVET_TOTAL_SLOTS   default 100000
//   RIVET_LOG_LEVEL     rivetkit's own log level (logs are JSON on stdout; default warn)
//   APP_SLEEP_TIMEOUT_MS  the actors' idle sleep timeout (default 2000)
//   APP_RUNNER_KEY      if set, the runner connects with this runner_key instead of the fresh
//                       random one `@rivetkit/engine-runner` picks per process (done with a
//                       module resolve hook, runner_key_hook.mjs; the package files are not
//                       touched). Lets a restarted process reuse its predecessor's key.
//
// stdout lines (split on whitespace; rivetkit's JSON log lines never start with these words):
//   STARTED pid=<pid> node=<version> runner_key=<key|random>
//   ACTOR_WAKE <actorId> count=<n> log=<n>          actor started (new or woken)
//   ACTOR_SLEEP_REQUESTED <actorId>                 the goToSleep action ran
//   ACTOR_SLEEP <actorId> count=<n> log=<n>         onSleep ran (the actor is stopping)
//   CONN_CONNECT <actorId> <connId> hibernatable=<bool>     rivetkit connected a conn (also for
//                                                   every stateless HTTP action: hibernatable=false)
//   CONN_DISCONNECT <actorId> <connId> hibernatable=<bool>
//   RAW_WS_OPEN <actorId> / RAW_WS_CLOSE <actorId> <code>
//   FATAL <message>                                 then exit status 1
//
// Exit: SIGKILL is what the tests use to crash it; SIGTERM/SIGINT are handled by the package.

import { register } from "node:module";

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

if (!process.env.RIVET_ENDPOINT && !process.env.RIVET_ENGINE) {
  fatal("config", new Error("RIVET_ENDPOINT is not set"));
}
process.env.RIVET_LOG_LEVEL ??= "warn";

if (process.env.APP_RUNNER_KEY) {
  register("./runner_key_hook.mjs", import.meta.url);
}

const { registry } = await import("./registry.mjs");
registry.startRunner();
emit(
  `STARTED pid=${process.pid} node=${process.version} runner_key=${process.env.APP_RUNNER_KEY || "random"}`,
);
