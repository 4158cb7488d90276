// `uuid` as `@rivetkit/engine-runner` sees it when APP_RUNNER_KEY is set (see
// runner_key_hook.mjs): `v4()` returns the configured runner key; everything else is the real
// package.
import { v4 as realV4 } from "uuid";

export * from "uuid";

export function v4(...args) {
  return process.env.APP_RUNNER_KEY || realV4(...args);
}
