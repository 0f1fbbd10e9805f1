-- Run once by the postgres image on a new data directory (as the owner,
-- POSTGRES_USER), before `betting migrate`: the LOGIN role the services
-- connect as (README "PostgreSQL roles"). `betting_app` is made here too so
-- that the login role can join it now; migration 20261124000002_roles.sql
-- finds it and grants it each table's rights.
--
-- DEV ONLY: the password is in this file and in compose.yaml. A real
-- deployment creates this role with a password from its secret store.
CREATE ROLE betting_app NOLOGIN;
CREATE ROLE betting_service LOGIN PASSWORD 'betting-service-dev-only' IN ROLE betting_app;
