// Reading the suite's errors: every refusal carries a gRPC code and a
// google.rpc.ErrorInfo whose reason names a betting.v1.ErrorReason value
// (without its prefix); RATE_LIMITED also says how long to wait.

import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorReason } from "./gen/betting/v1/errors_pb.js";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";

/** The ErrorInfo domain of the suite's reasons. */
export const ERROR_DOMAIN = "betting.v1";

/**
 * The betting.v1.ErrorReason of an error, or `undefined` if it has none we
 * know (a network failure, a reason newer than this SDK: act on the code).
 */
export function errorReason(err: unknown): ErrorReason | undefined {
  const info = ConnectError.from(err)
    .findDetails(ErrorInfoSchema)
    .find((detail) => detail.domain === ERROR_DOMAIN);
  if (info === undefined) return undefined;
  const value = (ErrorReason as unknown as Record<string, number | undefined>)[info.reason];
  return value === undefined || value === ErrorReason.UNSPECIFIED ? undefined : value;
}

/** How long the server asked the caller to wait (RetryInfo), in ms. */
export function retryDelayMs(err: unknown): number | undefined {
  const info = ConnectError.from(err).findDetails(RetryInfoSchema)[0];
  const delay = info?.retryDelay;
  if (delay === undefined) return undefined;
  return Number(delay.seconds) * 1000 + Math.ceil(delay.nanos / 1e6);
}

/** The fields a request had wrong (BadRequest), by field path. */
export function badFields(err: unknown): Map<string, string> {
  const fields = new Map<string, string>();
  for (const request of ConnectError.from(err).findDetails(BadRequestSchema)) {
    for (const violation of request.fieldViolations) {
      fields.set(violation.field, violation.description);
    }
  }
  return fields;
}

/**
 * Whether a call may be sent again as it was: the server or the network
 * failed, or asked the caller to slow down. Only for calls that are safe to
 * repeat (reads, or writes under the same idempotency key).
 */
export function isRetryable(err: unknown): boolean {
  const error = ConnectError.from(err);
  switch (error.code) {
    case Code.Unavailable:
    case Code.DeadlineExceeded:
    case Code.Aborted:
      return true;
    case Code.ResourceExhausted: {
      const reason = errorReason(error);
      return (
        reason === ErrorReason.RATE_LIMITED ||
        reason === ErrorReason.OVERLOADED ||
        reason === ErrorReason.STREAM_TOO_SLOW
      );
    }
    case Code.Unknown:
    case Code.Internal: {
      // A connection that broke before any status (fetch failed, the
      // server went away): the browser reports no code of its own.
      const reason = errorReason(error);
      return reason === undefined || reason === ErrorReason.INTERNAL;
    }
    default:
      return false;
  }
}

/** A sentence for a person: what went wrong and, where it helps, what to do. */
export function describeError(err: unknown): string {
  const error = ConnectError.from(err);
  switch (errorReason(error)) {
    case ErrorReason.INSUFFICIENT_FUNDS:
      return "Insufficient funds: the stake is more than your balance.";
    case ErrorReason.ROUND_NOT_OPEN:
      return "This round is closed: it takes no more bets.";
    case ErrorReason.ROUND_NOT_FOUND:
      return "There is no such round.";
    case ErrorReason.INVALID_ARGUMENT: {
      const fields = [...badFields(error)].map(([field, why]) => `${field}: ${why}`);
      return fields.length > 0 ? `Check the form (${fields.join("; ")}).` : `Invalid request: ${error.rawMessage}`;
    }
    case ErrorReason.UNAUTHENTICATED:
      return "Your token is missing, invalid or expired: log in again.";
    case ErrorReason.ROLE_REQUIRED:
      return "This token's role may not do that (players bet; use a player token).";
    case ErrorReason.RATE_LIMITED:
      return "Too many requests: wait a moment and try again.";
    case ErrorReason.TOO_MANY_OPEN_BETS:
      return "You have too many unmatched bets: wait for some to match or cancel them.";
    case ErrorReason.IDEMPOTENCY_KEY_REUSED:
      return "That idempotency key was already used for a different bet.";
    case ErrorReason.BET_NOT_CANCELLABLE:
      return "That bet can no longer be cancelled (it is matched or finished).";
    case ErrorReason.OVERLOADED:
    case ErrorReason.SHUTTING_DOWN:
    case ErrorReason.UNAVAILABLE:
      return "The server is busy or restarting: try again in a moment.";
    default:
      break;
  }
  if (error.code === Code.Unavailable || error.code === Code.Unknown) {
    return "Cannot reach the server: check the address, or wait while it restarts.";
  }
  return error.rawMessage || `Request failed (${Code[error.code]}).`;
}
