from emailproxy.cli import main

raise SystemExit(main())
