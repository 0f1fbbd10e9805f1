-- Least privilege: the services run as a member of `betting_app`, which may
-- read and write rows only as the code does. It owns nothing, so it cannot
-- ALTER (disable the append-only triggers), DROP or TRUNCATE anything, and it
-- has no DELETE anywhere and no UPDATE on the append-only tables.
--
-- Migrations run as the owner (whoever `betting migrate` connects as; it
-- needs CREATEROLE, or superuser, for the first database of a cluster).
-- The LOGIN role the services connect as (`betting_service` in the local
-- stack and the tests) is made by the deploy scripts and the test kit, with
-- its password where the deployment keeps secrets, never in a migration:
--   CREATE ROLE betting_service LOGIN PASSWORD '...' IN ROLE betting_app;
--
-- Roles are cluster-wide while this runs once per database, and the tests
-- migrate databases of one cluster concurrently: the role is created only
-- if missing, and a concurrent creator's win (duplicate_object, or
-- unique_violation on pg_authid when both inserted at once) is no error.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'betting_app') THEN
        BEGIN
            CREATE ROLE betting_app NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

-- Nobody but the owner creates objects in the schema (PostgreSQL 15's
-- default; older servers let PUBLIC create).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO betting_app;

-- Per table, exactly what the code does (no statement deletes a row).
-- Money, append-only (triggers refuse UPDATE/DELETE/TRUNCATE even to the
-- owner; without the privileges the app is refused before them):
GRANT SELECT, INSERT ON ledger_entries, wallet_refusals, payout_bets TO betting_app;
-- Balances change in place (`UPDATE wallets ... WHERE balance + delta >= 0`).
GRANT SELECT, INSERT, UPDATE ON wallets TO betting_app;
-- Rounds, bets and matches move through their statuses; `SELECT ... FOR
-- UPDATE` needs UPDATE too. The outbox marks refunds done.
GRANT SELECT, INSERT, UPDATE ON rounds, bets, matches, wallet_commands TO betting_app;
GRANT SELECT ON account_balances TO betting_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO betting_app;
-- Which migrations ran: readable, so a process can say the schema is behind.
GRANT SELECT ON _sqlx_migrations TO betting_app;

-- Tables and sequences later migrations create (run by the same owner) get
-- the app's common case with no work: read and append. A table whose rows the
-- services change grants UPDATE itself, next to its CREATE TABLE.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT ON TABLES TO betting_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO betting_app;
