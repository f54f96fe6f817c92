from eym.cli import main

raise SystemExit(main())
