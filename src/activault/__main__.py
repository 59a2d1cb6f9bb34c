from activault.cli import main

raise SystemExit(main())
