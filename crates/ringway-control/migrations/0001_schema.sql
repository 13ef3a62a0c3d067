-- Ringway schema, version 1: what the platform writes (projects, environments, deployments,
-- domains, certificates, ACME challenges) and what Ringway writes (proxy_logs).
-- Applied by `ringway migrate` (or at start with postgres.migrate_on_start) inside one
-- transaction under an advisory lock; see docs/postgres.md for every table.

CREATE TABLE projects (
    id          bigserial PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE environments (
    id          bigserial PRIMARY KEY,
    project_id  bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

-- A deployment is what a domain sends traffic to: its upstream addresses ("ip:port",
-- "[v6]:port" or "localhost:port"), one picked per request.
CREATE TABLE deployments (
    id              bigserial PRIMARY KEY,
    project_id      bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    environment_id  bigint NOT NULL REFERENCES environments(id) ON DELETE CASCADE,
    upstreams       text[] NOT NULL CHECK (cardinality(upstreams) BETWEEN 1 AND 256),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deployments_project ON deployments (project_id);

-- A host name pointing to a deployment, with per-domain options. Lower case, no trailing
-- dot, no port. "*.example.com" matches every host under example.com that no exact domain
-- names (a.example.com, a.b.example.com), not example.com itself. (Certificates differ:
-- a wildcard certificate covers one label only.)
CREATE TABLE domains (
    id                       bigserial PRIMARY KEY,
    hostname                 text NOT NULL UNIQUE CHECK (hostname = lower(hostname) AND hostname <> ''),
    deployment_id            bigint NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
    redirect_https           boolean NOT NULL DEFAULT false,
    hsts_max_age_s           integer CHECK (hsts_max_age_s >= 0),
    hsts_include_subdomains  boolean NOT NULL DEFAULT false,
    hsts_preload             boolean NOT NULL DEFAULT false,
    body_bytes_max           bigint CHECK (body_bytes_max > 0),
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domains_deployment ON domains (deployment_id);

-- A certificate for a domain (exact or wildcard name), PEM chain (leaf first) and PEM key.
-- Ringway parses and checks each row on its control thread; a row whose key does not match,
-- that has expired or that does not cover `domain` is reported and not served.
-- `is_default`: served to ClientHellos with no known name (at most one row).
CREATE TABLE certificates (
    id          bigserial PRIMARY KEY,
    domain      text NOT NULL UNIQUE CHECK (domain = lower(domain) AND domain <> ''),
    cert_pem    text NOT NULL,
    key_pem     text NOT NULL,
    expires_at  timestamptz,
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX certificates_one_default ON certificates (is_default) WHERE is_default;

-- ACME HTTP-01 challenges: answered on plain HTTP at /.well-known/acme-challenge/<token>.
CREATE TABLE acme_challenges (
    token              text PRIMARY KEY CHECK (token ~ '^[A-Za-z0-9_-]{1,255}$'),
    key_authorization  text NOT NULL,
    domain             text,
    created_at         timestamptz NOT NULL DEFAULT now()
);

-- Every request Ringway served (or refused), written in batches with COPY.
CREATE TABLE proxy_logs (
    ts              timestamptz NOT NULL,
    request_id      text NOT NULL,
    project_id      bigint,
    environment_id  bigint,
    deployment_id   bigint,
    host            text NOT NULL,
    method          text NOT NULL,
    path            text NOT NULL,
    status          smallint NOT NULL,
    duration_us     bigint NOT NULL,
    bytes_in        bigint NOT NULL,
    bytes_out       bigint NOT NULL,
    upstream        text,
    client_ip       inet NOT NULL,
    user_agent      text NOT NULL,
    reason          text NOT NULL,
    worker          smallint NOT NULL,
    node            text NOT NULL
);
CREATE INDEX proxy_logs_ts ON proxy_logs USING brin (ts);
CREATE INDEX proxy_logs_project_ts ON proxy_logs (project_id, ts);

-- Batches of proxy_logs already written, by id: a batch whose outcome was unknown (the
-- connection broke during COMMIT) is retried and skipped if it landed. Pruned after 7 days.
CREATE TABLE ringway_log_batches (
    batch_id    text PRIMARY KEY,
    rows        integer NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now()
);

-- Change notification: every write to a table Ringway serves from sends one NOTIFY on
-- channel "ringway_changes", delivered at commit. The payload names the table, the operation,
-- the row's key (old and new where it can change) and the time of the change.
CREATE FUNCTION ringway_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload jsonb;
BEGIN
    payload := jsonb_build_object(
        't', TG_TABLE_NAME,
        'op', TG_OP,
        'at_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    IF TG_TABLE_NAME = 'acme_challenges' THEN
        payload := payload || jsonb_build_object(
            'key', CASE WHEN TG_OP = 'DELETE' THEN OLD.token ELSE NEW.token END);
    ELSE
        payload := payload || jsonb_build_object(
            'id', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
    END IF;
    IF TG_TABLE_NAME = 'domains' AND TG_OP <> 'INSERT' THEN
        payload := payload || jsonb_build_object('old', OLD.hostname);
    ELSIF TG_TABLE_NAME = 'certificates' AND TG_OP <> 'INSERT' THEN
        payload := payload || jsonb_build_object('old', OLD.domain, 'old_default', OLD.is_default);
    END IF;
    PERFORM pg_notify('ringway_changes', payload::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER domains_notify AFTER INSERT OR UPDATE OR DELETE ON domains
    FOR EACH ROW EXECUTE FUNCTION ringway_notify();
CREATE TRIGGER deployments_notify AFTER INSERT OR UPDATE OR DELETE ON deployments
    FOR EACH ROW EXECUTE FUNCTION ringway_notify();
CREATE TRIGGER certificates_notify AFTER INSERT OR UPDATE OR DELETE ON certificates
    FOR EACH ROW EXECUTE FUNCTION ringway_notify();
CREATE TRIGGER acme_challenges_notify AFTER INSERT OR UPDATE OR DELETE ON acme_challenges
    FOR EACH ROW EXECUTE FUNCTION ringway_notify();

-- TRUNCATE fires no row triggers: tell Ringway to reload everything.
CREATE FUNCTION ringway_notify_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ringway_changes', jsonb_build_object('t', TG_TABLE_NAME, 'op', 'TRUNCATE')::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER domains_truncate AFTER TRUNCATE ON domains
    FOR EACH STATEMENT EXECUTE FUNCTION ringway_notify_truncate();
CREATE TRIGGER deployments_truncate AFTER TRUNCATE ON deployments
    FOR EACH STATEMENT EXECUTE FUNCTION ringway_notify_truncate();
CREATE TRIGGER certificates_truncate AFTER TRUNCATE ON certificates
    FOR EACH STATEMENT EXECUTE FUNCTION ringway_notify_truncate();
CREATE TRIGGER acme_challenges_truncate AFTER TRUNCATE ON acme_challenges
    FOR EACH STATEMENT EXECUTE FUNCTION ringway_notify_truncate();
