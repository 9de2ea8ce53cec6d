#!/usr/bin/env sysbench
-- Connection storm: every event opens a new connection, runs one query and disconnects.
--
-- sysbench 1.0.20 has no --reconnect option (it arrived in 1.1), so this script does it
-- by hand. Events per second is the figure we report: new MySQL sessions per second
-- through a path (TCP connect + MySQL handshake + login, one round trip, COM_QUIT).
--
--   sysbench bench/connect_storm.lua --db-driver=mysql --mysql-host=... --threads=8 \
--     --time=5 run

function thread_init()
   drv = sysbench.sql.driver()
end

function event()
   local con = drv:connect()
   con:query("SELECT 1")
   con:disconnect()
end
