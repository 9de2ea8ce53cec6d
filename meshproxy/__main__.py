from meshproxy.cli.main import main

raise SystemExit(main())
