#!/bin/sh
# Initialise an empty data directory the way the official image does, then run the server.
set -eu
datadir=/var/lib/mysql
if [ ! -d "$datadir/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db \
        --auth-root-authentication-method=socket >/dev/null
    {
        echo "FLUSH PRIVILEGES;"
        if [ -n "${MARIADB_DATABASE:-}" ]; then
            echo "CREATE DATABASE IF NOT EXISTS \`${MARIADB_DATABASE}\`;"
        fi
        if [ -n "${MARIADB_USER:-}" ]; then
            echo "CREATE USER '${MARIADB_USER}'@'%' IDENTIFIED BY '${MARIADB_PASSWORD:-}';"
            echo "GRANT ALL ON \`${MARIADB_DATABASE:-app}\`.* TO '${MARIADB_USER}'@'%';"
        fi
    } | mariadbd --user=mysql --datadir="$datadir" --bootstrap 2>/dev/null || { echo "mariadb-entrypoint: initialisation failed" >&2; exit 1; }
fi
exec "$@" --user=mysql --datadir="$datadir" --bind-address=0.0.0.0 --skip-name-resolve
