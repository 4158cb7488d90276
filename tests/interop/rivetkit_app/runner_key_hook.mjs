// Module resolve hook (registered by runner.mjs when APP_RUNNER_KEY is set): the `uuid` import
// of `@rivetkit/engine-runner` — used there only to pick the runner key — resolves to
// runner_key_uuid.mjs, which returns APP_RUNNER_KEY from `v4()`. Every other importer of
// `uuid` gets the real module.

export async function resolve(specifier, context, nextResolve) {
  if (
    specifier === "uuid" &&
    context.parentURL &&
    context.parentURL.includes("/@rivetkit/engine-runner/")
  ) {
    return {
      url: new URL("./runner_key_uuid.mjs", import.meta.url).href,
      shortCircuit: true,
    };
  }
  return nextResolve(specifier, context);
}
