-- Ringway schema, version 3: the load balancer. Upstreams as rows (an address or a DNS name,
-- a weight, a state) beside the deployment's `upstreams` array, and per-deployment balancing
-- settings. docs/load-balancing.md describes every setting.

-- An upstream of a deployment: "ip:port", "[v6]:port" or "name:port" (names are resolved by
-- each node's control thread, every address becoming an endpoint). `state`: active takes
-- requests; draining takes no new ones (in-flight ones finish, pooled connections close);
-- disabled is out of the route.
CREATE TABLE upstreams (
    id             bigserial PRIMARY KEY,
    deployment_id  bigint NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
    address        text NOT NULL CHECK (address <> ''),
    weight         integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000),
    state          text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'disabled')),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (deployment_id, address)
);

-- A deployment's upstreams are its array entries (weight 1, active) and its rows; the array
-- may now be empty when rows name them.
ALTER TABLE deployments DROP CONSTRAINT deployments_upstreams_check;
ALTER TABLE deployments ADD CONSTRAINT deployments_upstreams_check CHECK (cardinality(upstreams) <= 256);
ALTER TABLE deployments ALTER COLUMN upstreams SET DEFAULT '{}';

-- Balancing settings in the shape of the routes file's tables: {"balancer": {...},
-- "health_check": {...}, "outlier": {...}}; '{}' is every default.
ALTER TABLE deployments ADD COLUMN balancer jsonb NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(balancer) = 'object');

-- A change to an upstream row is a change to its deployment (old and new, if it moved).
CREATE FUNCTION ringway_notify_upstream() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('ringway_changes', jsonb_build_object('t', 'deployments', 'op', TG_OP,
            'id', OLD.deployment_id,
            'at_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)::text);
    END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.deployment_id <> OLD.deployment_id) THEN
        PERFORM pg_notify('ringway_changes', jsonb_build_object('t', 'deployments', 'op', TG_OP,
            'id', NEW.deployment_id,
            'at_us', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER upstreams_notify AFTER INSERT OR UPDATE OR DELETE ON upstreams
    FOR EACH ROW EXECUTE FUNCTION ringway_notify_upstream();
CREATE TRIGGER upstreams_truncate AFTER TRUNCATE ON upstreams
    FOR EACH STATEMENT EXECUTE FUNCTION ringway_notify_truncate();
