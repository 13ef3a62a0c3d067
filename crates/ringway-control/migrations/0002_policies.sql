-- Ringway schema, version 2: edge policies, and visitor/session ids in proxy_logs.

-- A policy for a project, or for one host (which then replaces its project's policy for
-- that host). `policy` holds everything but the IP rules, in the shape of the routes file's
-- [[policy]] table (docs/policy.md): ip_mode, block_user_agents, block_paths, rate_limit,
-- challenge, visitor_cookies.
CREATE TABLE access_policies (
    id          bigserial PRIMARY KEY,
    project_id  bigint UNIQUE REFERENCES projects(id) ON DELETE CASCADE,
    hostname    text UNIQUE CHECK (hostname = lower(hostname) AND hostname <> ''),
    policy      jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((project_id IS NULL) <> (hostname IS NULL))
);

-- IP rules of a policy, one row per address or range (a policy may hold 100,000 of them).
CREATE TABLE ip_rules (
    id          bigserial PRIMARY KEY,
    policy_id   bigint NOT NULL REFERENCES access_policies(id) ON DELETE CASCADE,
    cidr        cidr NOT NULL,
    action      text NOT NULL CHECK (action IN ('allow', 'deny')),
    note        text NOT NULL DEFAULT ''
);
CREATE INDEX ip_rules_policy ON ip_rules (policy_id);

ALTER TABLE proxy_logs ADD COLUMN visitor_id text, ADD COLUMN session_id text;

-- Notifications name the policy: a change to one IP rule re-reads its policy.
CREATE FUNCTION ringway_notify_policy() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload jsonb;
BEGIN
    -- For IP rules the transaction's start time: every row of one statement then sends the
    -- same payload, which PostgreSQL delivers once.
    payload := jsonb_build_object(
        't', 'access_policies',
        'at_us', (extract(epoch FROM CASE WHEN TG_TABLE_NAME = 'ip_rules' THEN now() ELSE clock_timestamp() END) * 1000000)::bigint);
    IF TG_TABLE_NAME = 'access_policies' THEN
        payload := payload || jsonb_build_object('id', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
        IF TG_OP <> 'INSERT' THEN
            payload := payload || jsonb_build_object('old_project', OLD.project_id, 'old_host', OLD.hostname);
        END IF;
    ELSE
        payload := payload || jsonb_build_object('id', CASE WHEN TG_OP = 'DELETE' THEN OLD.policy_id ELSE NEW.policy_id END);
    END IF;
    PERFORM pg_notify('ringway_changes', payload::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER access_policies_notify AFTER INSERT OR UPDATE OR DELETE ON access_policies
    FOR EACH ROW EXECUTE FUNCTION ringway_notify_policy();
-- Per row, but rows of one policy in one transaction send identical payloads (see above).
CREATE TRIGGER ip_rules_notify AFTER INSERT OR UPDATE OR DELETE ON ip_rules
    FOR EACH ROW EXECUTE FUNCTION ringway_notify_policy();
CREATE TRIGGER access_policies_truncate AFTER TRUNCATE ON access_policies
    FOR EACH STATEMENT EXECUTE FUNCTION ringway_notify_truncate();
CREATE TRIGGER ip_rules_truncate AFTER TRUNCATE ON ip_rules
    FOR EACH STATEMENT EXECUTE FUNCTION ringway_notify_truncate();
