from lmtrain.cli import main

raise SystemExit(main())
