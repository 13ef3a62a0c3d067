# Sourced by tests/run.sh: a throwaway PostgreSQL cluster for machines where no server runs.
#
#   pg_throwaway_start   # sets PG_THROWAWAY_PORT, PG_THROWAWAY_DIR
#   pg_throwaway_stop    # stops it and removes its directory
#
# PostgreSQL refuses to run as root; as root the cluster runs as the `postgres` user (the
# Debian package creates it) with runuser.

pg_throwaway_bin() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) /usr/local/pgsql/bin; do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            echo "$d"
            return 0
        fi
    done
    command -v initdb >/dev/null 2>&1 && dirname "$(command -v initdb)" && return 0
    return 1
}

pg_throwaway_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

pg_throwaway_start() {
    local bin run
    if ! bin="$(pg_throwaway_bin)"; then
        echo "tests: no PostgreSQL server at 127.0.0.1:5432 and no initdb to start one;" >&2
        echo "       install the server (apt-get install postgresql) or set RINGWAY_TEST_PG" >&2
        exit 1
    fi
    PG_THROWAWAY_DIR="$(mktemp -d /tmp/ringway-pg.XXXXXX)"
    PG_THROWAWAY_PORT="$(pg_throwaway_free_port)"
    run=()
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres "$PG_THROWAWAY_DIR"
        run=(runuser -u postgres --)
    fi
    "${run[@]}" "$bin/initdb" -D "$PG_THROWAWAY_DIR/data" -U postgres -A trust --no-sync -E UTF8 >"$PG_THROWAWAY_DIR/initdb.log" 2>&1 \
        || { cat "$PG_THROWAWAY_DIR/initdb.log" >&2; exit 1; }
    "${run[@]}" "$bin/pg_ctl" -D "$PG_THROWAWAY_DIR/data" -l "$PG_THROWAWAY_DIR/server.log" -w -t 60 \
        -o "-p $PG_THROWAWAY_PORT -k $PG_THROWAWAY_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
        || { cat "$PG_THROWAWAY_DIR/server.log" >&2; exit 1; }
    PG_THROWAWAY_BIN="$bin"
    PG_THROWAWAY_RUN=("${run[@]}")
    echo "tests: started a throwaway PostgreSQL on 127.0.0.1:$PG_THROWAWAY_PORT ($PG_THROWAWAY_DIR)" >&2
}

pg_throwaway_stop() {
    if [[ -n "${PG_THROWAWAY_DIR:-}" ]]; then
        "${PG_THROWAWAY_RUN[@]}" "$PG_THROWAWAY_BIN/pg_ctl" -D "$PG_THROWAWAY_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PG_THROWAWAY_DIR"
    fi
}
