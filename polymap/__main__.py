from polymap.cli import main

raise SystemExit(main())
