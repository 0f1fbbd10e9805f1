// Waiting between tries: capped exponential backoff with jitter, and a sleep
// that an AbortSignal cuts short.

/** How long to wait before try `attempt + 1` (attempt counts from 1), in ms. */
export type Backoff = (attempt: number) => number;

/** 200 ms, 400 ms, 800 ms, ... up to 5 s, each between half and all of it. */
export const defaultBackoff: Backoff = (attempt) => {
  const full = Math.min(5_000, 200 * 2 ** Math.max(0, attempt - 1));
  return full / 2 + Math.random() * (full / 2);
};

/** Resolves after `ms`, or at once (without throwing) when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}
