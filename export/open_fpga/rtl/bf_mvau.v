// bitfold matrix-vector-activation unit (Verilog-2005; yosys, verilator and iverilog).
//
// One convolution (K x K window, STRIDE, PAD with the code PADCODE) or one dense layer
// (IH = IW = K = 1), folded as PE output channels x SIMD input elements per cycle, followed by a
// multi-threshold activation (NT sorted thresholds per channel: out = #{k : acc >= T[k]}) or, when
// NT = 0, the low OBITS bits of the raw signed accumulator.
//
// Activation: up to PARNT thresholds are compared in parallel (one ROM word per channel group holds
// them all). Above that a pipelined binary search: OBITS levels, each a read of
// one threshold per lane from a memory of its own (level l holds 2^l thresholds per channel, file
// TFILE_pPPP_lLL.mem, so the deep levels go to block RAM) and one comparison - logic grows with
// OBITS, not with 2^OBITS, and every level is a register stage (one result a cycle).
//
// Window taps (TAPS = K: a row of the window, K*K: all of it; needs SIMD = IC): that many copies of
// the input buffer, each read at its own tap's address, so a layer with few input channels (a first
// layer: IC = 1) still feeds TAPS*SIMD lanes a cycle; a weight word then spans TAPS*SIMD consecutive
// columns of the (ky, kx, c) matrix.
//
// Streams: valid/ready. The input carries SIMD elements per beat (element 0 in the low bits),
// pixel-major (H, W, C) order, unsigned IBITS-bit codes; the output carries PE channels per beat in
// the same order. Weights are signed WBITS-bit integers.
//
// Schedule: the input map is written into one bank of a two-bank buffer while the other bank is
// computed on, so loading frame n+1 overlaps computing frame n. For every output pixel and every
// group of PE channels, SF = K*K*IC/SIMD buffer/weight words are issued, one per cycle, into a
// pipeline: address register -> memory reads (-> a second register, RDREG) -> lane products -> adder tree (a register every two
// levels) -> accumulator -> threshold compare -> count -> output FIFO. A new channel group starts
// only when the FIFO has room for it (credits count groups in flight), so back-pressure never
// drops a result and the issue never waits on the output otherwise: cycles per frame approach
// max(input words, OH*OW*NF*SF). Weights and thresholds are ROMs initialised from WFILE / TFILE
// ($readmemh), so yosys can map them to block RAM.
module bf_mvau #(
  parameter IH = 1, IW = 1, IC = 4, OC = 4, K = 1, STRIDE = 1, PAD = 0, OH = 1, OW = 1,
  parameter SIMD = 1, PE = 1,
  parameter TAPS = 1,              // window taps read a cycle: 1, K or K*K (> 1: SIMD = IC)
  parameter IBITS = 2, WBITS = 2, ACCB = 16, OBITS = 2, NT = 3,
  parameter PADCODE = 0,
  parameter PARNT = 7,             // at most this many thresholds compared in parallel (else binary search)
  parameter RDREG = 0,             // 1: one more register after the buffer/ROM reads (block RAM clock-to-out)
  parameter RDPRE = 0,             // 1 (with RDREG): one more register right after the reads, before RDREG's copies
  parameter RDFAN = 8,             // RDREG = 1: PE lanes fed by one copy of the registered input read
  parameter WABITS = 0,            // > 0: weight-word bits read through one copy of the ROM address register
  parameter APIPE = 0,             // 1: the input read address computed over two register stages (a cycle more)
  parameter DSPREG = 0,            // 1: the lanes' products in DSP blocks, input and output registered (bf_dspmul; a cycle more)
  parameter WFILE = "w.mem", TFILE = "t.mem", WCFILE = "wc"
) (
  input  wire clk,
  input  wire rst,
  input  wire in_valid,
  output wire in_ready,
  input  wire [SIMD*IBITS-1:0] in_data,
  output wire out_valid,
  input  wire out_ready,
  output wire [PE*OBITS-1:0] out_data
);
  localparam CG = IC / SIMD;       // channel groups per pixel
  localparam LN = TAPS * SIMD;     // lanes (products) per PE
  localparam SF = K * K * CG / TAPS;   // weight words per output channel group
  localparam NF = OC / PE;         // output channel groups
  localparam IWORDS = IH * IW * CG;
  localparam TW = (NT > 0 && NT <= PARNT) ? NT : 1;   // thresholds in a parallel-compare ROM word
  localparam CW = $clog2(2 * IWORDS + NF * SF + IH + IW + OC + K + 2) + 1;
  localparam [IBITS-1:0] PADC = PADCODE;
  localparam PB = WBITS + IBITS + 1;            // product width
  localparam LOG2 = $clog2(LN);                 // adder tree levels
  localparam P2 = 1 << LOG2;                    // lanes rounded up to a power of two
  localparam TL = (LOG2 + 1) / 2;               // registered tree levels (every second + the root)
  localparam TLC = TL + DSPREG;                 // registers between stage B's control and the tree's root
  localparam PAR = (NT > 0) && (NT <= PARNT);      // thresholds compared in parallel (else binary search)
  localparam BSL = (NT > PARNT) ? OBITS * (2 + RDREG) : 2;   // accumulator -> result (search levels)
  // copies of the registered input read (the pad code already in), one per RDFAN lanes: every input bit
  // feeds all PE lanes, and one register driving 32 lanes x SIMD multipliers was the critical path
  // of a wide convolution (routing across the lanes). One copy (PE <= RDFAN) is the plain register.
  localparam NRC = (RDREG && PE > RDFAN) ? (PE + RDFAN - 1) / RDFAN : 1;
  // copies of the weight ROM's address register, one per WABITS bits of the word: a ROM that yosys
  // keeps in logic is a LUT per word bit on every address bit, and one register driving a
  // 1,024-bit word was the critical path of the digits CNN's conv2 (2.3 ns routes into the LUTs)
  localparam WWB = PE * LN * WBITS;
  localparam NWC = (WABITS > 0 && WWB > WABITS) ? (WWB + WABITS - 1) / WABITS : 1;
  // with copies, one more cycle before the reads: the copies load from the one address register,
  // so the issue counters drive a single adder (with 16 copies fed from them, conv2's counter
  // updates spread over 50 rows of the device: 76 MHz on the Fashion-MNIST CNN)
  // APIPE: the same extra cycle, given to the input buffers' address arithmetic (window position ->
  // row and column, then pad test and row * IW * CG + column * CG + group): in one cycle it was the
  // critical path of the Fashion-MNIST CNN (oy -> tap read address, 11.6 ns)
  localparam WP = (NWC > 1 || APIPE) ? 1 : 0;
  localparam LAT = 5 + RDREG + RDPRE + TLC + BSL + WP;   // issue -> FIFO write
  // credits come back CRD cycles after the FIFO read (registers between the output FIFO and the
  // issue counters: in a wide layer the two sit far apart - the digits CNN W4A4's conv1 spent 7.9 ns
  // routing its FIFO pop into the credit counter), so the FIFO holds that many cycles' groups more
  localparam CRD = 2;
  localparam NEED = (LAT + CRD + SF - 1) / SF + 2;   // groups the FIFO must hold to never stall the issue
  localparam DEPTH = 1 << $clog2(NEED);
  localparam DW = $clog2(DEPTH);

  // ---------------------------------------------------------------- two-bank input buffer
  reg [PE*LN*WBITS-1:0] wrom [0:NF*SF-1];
  initial $readmemh(WFILE, wrom);

  reg full0, full1;                // bank holds a complete frame not yet computed
  reg wb;                          // bank being written
  reg [CW-1:0] wp;                 // write address within the two banks
  // in_ready is a register (the next cycle's room): as !rst && !wfull it went from the layer's reset
  // copy through a LUT into the converter before the layer, whose buffer shifts on it (a mux select on
  // every buffer bit) - the critical path of both W3A3 CNNs (digits: conv2's reset copy -> u_dwc3,
  // 11.6 ns of which 9.0 routing; Fashion-MNIST: dense0's -> u_dwc6, 11.0 ns). Its next value is the
  // next bank state below: a bank is set by the writer's last word (which wins over a release of the
  // same bank, as in the always block) and cleared by the reader's release.
  reg rdy = 1'b0;
  assign in_ready = rdy;
  wire wr = in_valid && in_ready;
  wire wlast = (wp == IWORDS - 1) || (wp == 2 * IWORDS - 1);
  wire wdone = wr && wlast;

  // ---------------------------------------------------------------- issue
  reg rb;                          // bank being computed
  reg [CW-1:0] oy, ox, nf, ky, kx, cg, sf, wbase;
  reg [DW+1:0] used;               // groups issued and not yet read from the FIFO
  wire rfull = rb ? full1 : full0;
  wire last_sf = (sf == SF - 1);
  wire go = rfull && ((sf != 0) || (used < DEPTH));
  wire fifo_pop = out_valid && out_ready;

  // stage 0: addresses
  reg [CW-1:0] wa0, nf0, nf1;
  reg v0, first0, last0, v1, first1, last1;   // stage 1 (WP = 1): the same, one cycle later
  // stage A: memory reads
  wire [LN*IBITS-1:0] rdA;         // tap j's SIMD elements at lanes j*SIMD..
  wire [TAPS-1:0] padA;            // tap j lies in the padding
  wire [PE*LN*WBITS-1:0] wdA;
  reg [CW-1:0] nfA;
  reg vA, firstA, lastA;
  // stage B: lane products
  reg [PE*LN*PB-1:0] prodB;
  reg [CW-1:0] nfB;
  reg vB, firstB, lastB;

  // one buffer copy per tap, each read at its own tap's address (TAPS = 1: the window position
  // (ky, kx) the issue counts; TAPS = K: the row ky, column j; TAPS = K*K: position j)
  genvar gk;
  generate
    for (gk = 0; gk < TAPS; gk = gk + 1) begin : tap
      wire [CW-1:0] tky = (TAPS > 1 && TAPS == K * K) ? gk / K : ky;
      wire [CW-1:0] tkx = (TAPS > 1) ? gk % K : kx;
      wire signed [CW+1:0] iy = $signed({2'b00, oy}) * STRIDE + $signed({2'b00, tky}) - PAD;
      wire signed [CW+1:0] ix = $signed({2'b00, ox}) * STRIDE + $signed({2'b00, tkx}) - PAD;
      wire padnow = (iy < 0) || (iy >= IH) || (ix < 0) || (ix >= IW);
      wire [CW+1:0] raddr = padnow ? {(CW+2){1'b0}} : ((iy * IW + ix) * CG + cg + (rb ? IWORDS : 0));
      reg [CW+1:0] ra0, ra1;
      reg pad0, pad1, padq;
`ifdef BF_BLOCK_RAM
      (* ram_style = "block" *)
`endif
      reg [SIMD*IBITS-1:0] ibuf [0:2*IWORDS-1];
      reg [SIMD*IBITS-1:0] rdq;        // the registered read
      always @(posedge clk) begin
        rdq <= ibuf[WP ? ra1 : ra0];
        if (wr) ibuf[wp] <= in_data;
      end
      wire [CW+1:0] ra1_d;             // the next ra1
      wire pad1_d;
      if (APIPE) begin : apipe
        // stage 0: the window position's row and column (and the group's offset in the bank);
        // stage 1: the pad test and the address
        reg signed [CW+1:0] iyq, ixq;
        reg [CW+1:0] offq;
        always @(posedge clk) begin iyq <= iy; ixq <= ix; offq <= cg + (rb ? IWORDS : 0); end
        assign pad1_d = (iyq < 0) || (iyq >= IH) || (ixq < 0) || (ixq >= IW);
        assign ra1_d = pad1_d ? {(CW+2){1'b0}} : ((iyq * IW + ixq) * CG + offq);
      end else begin : aone
        assign ra1_d = ra0;
        assign pad1_d = pad0;
      end
      always @(posedge clk) begin
        ra0 <= raddr; pad0 <= padnow; ra1 <= ra1_d; pad1 <= pad1_d;
        padq <= WP ? pad1 : pad0;
      end
      assign rdA[gk*SIMD*IBITS +: SIMD*IBITS] = rdq;
      assign padA[gk] = padq;
    end
  endgenerate

  // the weight ROM read: one address register, or NWC kept copies each reading a ROM of its own
  // that holds its slice of the word (one memory read at NWC addresses: yosys ran out of memory)
  genvar gw;
  generate
    if (NWC > 1) begin : wacopy
      for (gw = 0; gw < NWC; gw = gw + 1) begin : c
        localparam LO = gw * WABITS;
        localparam W = (LO + WABITS > WWB) ? WWB - LO : WABITS;
        localparam [7:0] C2 = "0" + (gw / 100) % 10, C1 = "0" + (gw / 10) % 10, C0 = "0" + gw % 10;
        // the slice's own ROM (file WCFILE<CCC>.mem: bits LO.. of every word), read at its own address
        reg [W-1:0] wslice [0:NF*SF-1];
        initial $readmemh({WCFILE, C2, C1, C0, ".mem"}, wslice);
        reg [CW-1:0] wa;
        reg [W-1:0] wq;
        (* keep *) always @(posedge clk) wa <= wa0;
        always @(posedge clk) wq <= wslice[wa];
        assign wdA[LO +: W] = wq;
      end
    end else begin : wasingle
      reg [WWB-1:0] wq;
      reg [CW-1:0] wa1;
      always @(posedge clk) begin wa1 <= wa0; wq <= wrom[WP ? wa1 : wa0]; end
      assign wdA = wq;
    end
  endgenerate

  // stage P (RDPRE = 1): the memory outputs registered where they come out, before stage R's
  // copies: a block-RAM input buffer's 5.6 ns clock-to-out, a LUT and the routes to two copies
  // were the digits CNN W4A4's critical path (11.2 ns)
  reg [LN*IBITS-1:0] rdP;
  reg [TAPS-1:0] padP;
  reg [PE*LN*WBITS-1:0] wdP;
  reg [CW-1:0] nfP;
  reg vP, firstP, lastP;
  always @(posedge clk) begin
    rdP <= rdA; padP <= padA; wdP <= wdA; nfP <= nfA; vP <= vA; firstP <= firstA; lastP <= lastA;
    if (rst) vP <= 1'b0;
  end
  wire [LN*IBITS-1:0] rdY = RDPRE ? rdP : rdA;
  wire [TAPS-1:0] padY = RDPRE ? padP : padA;
  wire [PE*LN*WBITS-1:0] wdY = RDPRE ? wdP : wdA;
  wire [CW-1:0] nfY = RDPRE ? nfP : nfA;
  wire vY = RDPRE ? vP : vA, firstY = RDPRE ? firstP : firstA, lastY = RDPRE ? lastP : lastA;

  // the pad code put in where a read lies in the padding, once per input element before the
  // registers of stage R: applied in every lane's product instead, one pad-flag register drove
  // PE x SIMD lanes (the digits CNN W4A4's conv2: padR -> a lane's adder, 10.3 ns with 7.9 routing)
  wire [LN*IBITS-1:0] rdM;
  genvar gm;
  generate
    for (gm = 0; gm < LN; gm = gm + 1) begin : padmux
      assign rdM[gm*IBITS +: IBITS] = padY[gm / SIMD] ? PADC : rdY[gm*IBITS +: IBITS];
    end
  endgenerate

  // stage R (RDREG = 1): the reads registered once more
  reg [LN*IBITS-1:0] rdR;          // NRC = 1
  wire [NRC*LN*IBITS-1:0] rdC;     // NRC > 1: the copies
  reg [PE*LN*WBITS-1:0] wdR;
  reg [CW-1:0] nfR;
  reg vR, firstR, lastR;
  wire [LN*IBITS-1:0] rdX = RDREG ? rdR : rdM;
  genvar gc;
  generate
    if (NRC > 1) begin : rdcopy
      for (gc = 0; gc < NRC; gc = gc + 1) begin : c
        reg [LN*IBITS-1:0] q;
        // keep: identical registers would otherwise be merged back into one by yosys (opt_merge)
        (* keep *) always @(posedge clk) q <= rdM;
        assign rdC[gc*LN*IBITS +: LN*IBITS] = q;
      end
    end else begin : rdsingle
      assign rdC = rdX;
    end
  endgenerate
  wire [PE*LN*WBITS-1:0] wdX = RDREG ? wdR : wdY;
  wire [CW-1:0] nfX = RDREG ? nfR : nfY;
  wire vX = RDREG ? vR : vY, firstX = RDREG ? firstR : firstY, lastX = RDREG ? lastR : lastY;

  integer p, s;
  always @(posedge clk) begin
    wa0 <= wbase + sf; nf0 <= nf;
    v0 <= go; first0 <= (sf == 0); last0 <= last_sf;
    nf1 <= nf0; v1 <= v0; first1 <= first0; last1 <= last0;
    nfA <= WP ? nf1 : nf0;
    vA <= WP ? v1 : v0; firstA <= WP ? first1 : first0; lastA <= WP ? last1 : last0;
    if (NRC == 1) rdR <= rdM;
    wdR <= wdY; nfR <= nfY; vR <= vY; firstR <= firstY; lastR <= lastY;
    for (p = 0; p < PE; p = p + 1)
      for (s = 0; s < LN; s = s + 1)
        prodB[(p*LN+s)*PB +: PB] <= $signed(wdX[(p*LN+s)*WBITS +: WBITS])
                                    * $signed({1'b0, rdC[((p / RDFAN % NRC) * LN + s)*IBITS +: IBITS]});
    nfB <= nfX; vB <= vX; firstB <= firstX; lastB <= lastX;
    if (rst) begin
      v0 <= 1'b0; v1 <= 1'b0; vA <= 1'b0; vR <= 1'b0; vB <= 1'b0;
    end
  end

  // DSPREG: the products in DSP blocks with their own input and output registers (bf_dspmul), from
  // the same stage-R operands, a cycle after stage B's fabric products (which are then unused): with
  // combinational DSPs between fabric registers the digits CNN W4A4 placed at 61.6 MHz - 8.4 ns of
  // routing into a DSP column, 3.9 through the multiplier. The control waits that cycle in TLC.
  wire [PE*LN*PB-1:0] prodD;
  genvar gq, gs;
  generate
    if (DSPREG) begin : dsp
      for (gq = 0; gq < PE; gq = gq + 1) begin : pe
        for (gs = 0; gs < LN; gs = gs + 1) begin : lane
          bf_dspmul #(.AW(WBITS), .BW(IBITS + 1), .PW(PB)) m (
            .clk(clk), .a(wdX[(gq*LN+gs)*WBITS +: WBITS]),
            .b({1'b0, rdC[((gq / RDFAN % NRC) * LN + gs)*IBITS +: IBITS]}), .p(prodD[(gq*LN+gs)*PB +: PB]));
        end
      end
    end else begin : nodsp
      assign prodD = {(PE*LN*PB){1'b0}};
    end
  endgenerate
  wire [PE*LN*PB-1:0] prodE = DSPREG ? prodD : prodB;   // the adder tree's leaves

  // ---------------------------------------------------------------- adder tree (per PE lane)
  // heap layout: node i has children 2i and 2i+1, leaves at P2..2*P2-1; a node at height h
  // (leaves' parents: 1) is a register when h is even or it is the root
  wire [PE*2*P2*ACCB-1:0] tree;
  wire [PE*ACCB-1:0] sumT;
  genvar gp, gi;
  generate
    for (gp = 0; gp < PE; gp = gp + 1) begin : lane
      for (gi = 0; gi < P2; gi = gi + 1) begin : leaf
        if (gi < LN && ACCB > PB) begin : used_leaf
          assign tree[(gp*2*P2 + P2 + gi)*ACCB +: ACCB] =
            {{(ACCB-PB){prodE[(gp*LN+gi)*PB + PB - 1]}}, prodE[(gp*LN+gi)*PB +: PB]};
        end else if (gi < LN) begin : narrow_leaf
          // the accumulator is sized for the whole dot product, so every single product fits its
          // ACCB bits (e.g. bipolar 1-bit products on a small fan-in): the low bits are exact
          assign tree[(gp*2*P2 + P2 + gi)*ACCB +: ACCB] = prodE[(gp*LN+gi)*PB +: ACCB];
        end else begin : zero_leaf
          assign tree[(gp*2*P2 + P2 + gi)*ACCB +: ACCB] = {ACCB{1'b0}};
        end
      end
      for (gi = 1; gi < P2; gi = gi + 1) begin : node
        localparam integer H = LOG2 - $clog2(gi + 1) + 1;   // height of node gi
        wire [ACCB-1:0] a = tree[(gp*2*P2 + 2*gi)*ACCB +: ACCB];
        wire [ACCB-1:0] b = tree[(gp*2*P2 + 2*gi + 1)*ACCB +: ACCB];
        if ((H % 2 == 0) || (gi == 1)) begin : r
          reg [ACCB-1:0] q;
          always @(posedge clk) q <= a + b;
          assign tree[(gp*2*P2 + gi)*ACCB +: ACCB] = q;
        end else begin : c
          assign tree[(gp*2*P2 + gi)*ACCB +: ACCB] = a + b;
        end
      end
      assign sumT[gp*ACCB +: ACCB] = tree[(gp*2*P2 + 1)*ACCB +: ACCB];   // the root (a leaf if LN = 1)
    end
  endgenerate
  // the control bits travel alongside the tree's TL registers (and DSPREG's)
  reg [TLC:0] vT, firstT, lastT;
  reg [(TLC+1)*CW-1:0] nfT;
  integer t;
  always @(posedge clk) begin
    vT[0] <= 1'b0; firstT[0] <= 1'b0; lastT[0] <= 1'b0;
    for (t = TLC; t > 0; t = t - 1) begin
      vT[t] <= (t == 1) ? vB : vT[t-1];
      firstT[t] <= (t == 1) ? firstB : firstT[t-1];
      lastT[t] <= (t == 1) ? lastB : lastT[t-1];
      nfT[t*CW +: CW] <= (t == 1) ? nfB : nfT[(t-1)*CW +: CW];
    end
    if (rst) vT <= {(TLC+1){1'b0}};
  end
  wire vS = (TLC == 0) ? vB : vT[TLC];
  wire firstS = (TLC == 0) ? firstB : firstT[TLC];
  wire lastS = (TLC == 0) ? lastB : lastT[TLC];
  wire [CW-1:0] nfS = (TLC == 0) ? nfB : nfT[TLC*CW +: CW];
  wire [PE*ACCB-1:0] sumS = sumT;

  // ---------------------------------------------------------------- accumulate
  reg [PE*ACCB-1:0] acc;
  reg doneD;
  reg [CW-1:0] nfD;
  wire [PE*TW*ACCB-1:0] thrD;
  integer q;
  always @(posedge clk) begin
    if (vS)
      for (q = 0; q < PE; q = q + 1)
        acc[q*ACCB +: ACCB] <= firstS ? sumS[q*ACCB +: ACCB] : acc[q*ACCB +: ACCB] + sumS[q*ACCB +: ACCB];
    doneD <= vS && lastS;
    nfD <= nfS;
    if (rst) doneD <= 1'b0;
  end
  generate
    if (NT <= PARNT) begin : trom_par
      // all thresholds of a channel group in one ROM word, read alongside the accumulation
      reg [PE*TW*ACCB-1:0] trom [0:NF-1];
      reg [PE*TW*ACCB-1:0] thrQ;
      initial $readmemh(TFILE, trom);
      always @(posedge clk) thrQ <= trom[nfS];
      assign thrD = thrQ;
    end else begin : trom_none
      assign thrD = {(PE*TW*ACCB){1'b0}};
    end
  endgenerate

  // ---------------------------------------------------------------- activation
  // parallel (NT <= PARNT): one comparison per threshold (registered), then the count of passed
  // thresholds
  reg [PE*TW-1:0] geE;
  reg [PE*ACCB-1:0] accE;
  reg doneE;
  reg [PE*OBITS-1:0] actF;
  reg doneF;
  reg [OBITS:0] cnt;
  integer r, k;
  always @(posedge clk) begin
    for (r = 0; r < PE; r = r + 1)
      for (k = 0; k < TW; k = k + 1)
        geE[r*TW + k] <= $signed(acc[r*ACCB +: ACCB]) >= $signed(thrD[(r*TW + k)*ACCB +: ACCB]);
    accE <= acc;
    doneE <= doneD;
    for (r = 0; r < PE; r = r + 1) begin
      if (NT == 0) begin
        actF[r*OBITS +: OBITS] <= accE[r*ACCB +: OBITS];
      end else if (PAR) begin
        cnt = {(OBITS+1){1'b0}};
        for (k = 0; k < TW; k = k + 1)
          cnt = cnt + geE[r*TW + k];
        actF[r*OBITS +: OBITS] <= cnt[OBITS-1:0];
      end
    end
    doneF <= doneE;
    if (rst) begin doneE <= 1'b0; doneF <= 1'b0; end
  end
  // binary search (NT > PARNT): level l decides bit OBITS-1-l of every lane's count; a level is a
  // read of the threshold at the lane's candidate (address {group, prefix}, a synchronous read:
  // block RAM), RDREG more registers, then the comparison. acc, group and prefix travel along.
  wire doneBS;
  wire [PE*OBITS-1:0] actBS;
  generate
    if (NT > PARNT) begin : bsearch
      localparam LV = OBITS;
      wire [LV:0] vL;
      wire [(LV+1)*CW-1:0] nfL;
      wire [(LV+1)*PE*ACCB-1:0] accL;
      wire [(LV+1)*PE*OBITS-1:0] idxL;
      assign vL[0] = doneD;
      assign nfL[0 +: CW] = nfD;
      assign accL[0 +: PE*ACCB] = acc;
      assign idxL[0 +: PE*OBITS] = {(PE*OBITS){1'b0}};
      genvar gl, gq;
      for (gl = 0; gl < LV; gl = gl + 1) begin : level
        localparam integer B = OBITS - 1 - gl;          // the bit this level decides
        localparam integer DL = NF * (1 << gl);          // thresholds per lane at this level
        wire [CW-1:0] nf_i = nfL[gl*CW +: CW];
        wire [PE*ACCB-1:0] acc_i = accL[gl*PE*ACCB +: PE*ACCB];
        wire [PE*OBITS-1:0] idx_i = idxL[gl*PE*OBITS +: PE*OBITS];
        // stage a: the reads
        reg va, vb;
        reg [CW-1:0] nfa, nfb;
        reg [PE*ACCB-1:0] acca, accb;
        reg [PE*OBITS-1:0] idxa, idxb;
        wire [PE*ACCB-1:0] rd;
        always @(posedge clk) begin
          va <= vL[gl]; nfa <= nf_i; acca <= acc_i; idxa <= idx_i;
          vb <= va; nfb <= nfa; accb <= acca; idxb <= idxa;
          if (rst) begin va <= 1'b0; vb <= 1'b0; end
        end
        for (gq = 0; gq < PE; gq = gq + 1) begin : lane
          localparam [7:0] P2C = "0" + (gq / 100) % 10, P1C = "0" + (gq / 10) % 10, P0C = "0" + gq % 10;
          localparam [7:0] L1C = "0" + (gl / 10) % 10, L0C = "0" + gl % 10;
          reg [ACCB-1:0] tmem [0:DL-1];
          reg [ACCB-1:0] tq, tr;
          initial $readmemh({TFILE, "_p", P2C, P1C, P0C, "_l", L1C, L0C, ".mem"}, tmem);
          wire [CW+OBITS-1:0] addr;
          if (gl == 0) begin : a0
            assign addr = nf_i;
          end else begin : an
            assign addr = nf_i * (1 << gl) + (idx_i[gq*OBITS +: OBITS] >> (B + 1));
          end
          always @(posedge clk) begin
            tq <= tmem[addr];
            tr <= tq;
          end
          assign rd[gq*ACCB +: ACCB] = RDREG ? tr : tq;
        end
        // stage c: the comparison
        wire vx = RDREG ? vb : va;
        wire [CW-1:0] nfx = RDREG ? nfb : nfa;
        wire [PE*ACCB-1:0] accx = RDREG ? accb : acca;
        wire [PE*OBITS-1:0] idxx = RDREG ? idxb : idxa;
        reg vc;
        reg [CW-1:0] nfc;
        reg [PE*ACCB-1:0] accc;
        reg [PE*OBITS-1:0] idxc;
        integer qq;
        always @(posedge clk) begin
          vc <= vx; nfc <= nfx; accc <= accx;
          for (qq = 0; qq < PE; qq = qq + 1)
            // candidate count = prefix | 2^B; counts above NT do not exist (their entries are unused)
            idxc[qq*OBITS +: OBITS] <= idxx[qq*OBITS +: OBITS]
              | ((((idxx[qq*OBITS +: OBITS] | (1 << B)) <= NT)
                  && ($signed(accx[qq*ACCB +: ACCB]) >= $signed(rd[qq*ACCB +: ACCB]))) ? (1 << B) : 0);
          if (rst) vc <= 1'b0;
        end
        assign vL[gl+1] = vc;
        assign nfL[(gl+1)*CW +: CW] = nfc;
        assign accL[(gl+1)*PE*ACCB +: PE*ACCB] = accc;
        assign idxL[(gl+1)*PE*OBITS +: PE*OBITS] = idxc;
      end
      assign doneBS = vL[LV];
      assign actBS = idxL[LV*PE*OBITS +: PE*OBITS];
    end else begin : no_bsearch
      assign doneBS = 1'b0;
      assign actBS = {(PE*OBITS){1'b0}};
    end
  endgenerate
  wire [PE*OBITS-1:0] result = (NT > PARNT) ? actBS : actF;
  wire rdone = (NT > PARNT) ? doneBS : doneF;

  // ---------------------------------------------------------------- output FIFO
  reg [PE*OBITS-1:0] fifo [0:DEPTH-1];
  reg [DW-1:0] fw, fr;
  reg [DW:0] fcount;
  assign out_valid = (fcount != 0);
  assign out_data = fifo[fr];
  always @(posedge clk) begin
    if (rdone) begin
      fifo[fw] <= result;
      fw <= fw + 1'b1;
    end
    if (fifo_pop) fr <= fr + 1'b1;
    fcount <= fcount + (rdone ? 1'b1 : 1'b0) - (fifo_pop ? 1'b1 : 1'b0);
    if (rst) begin fw <= 0; fr <= 0; fcount <= 0; end
  end

  // ---------------------------------------------------------------- control
  reg [CRD-1:0] popd;               // FIFO reads, CRD cycles late: the credits they return
  always @(posedge clk) popd <= rst ? {CRD{1'b0}} : {popd[CRD-2:0], fifo_pop};
  reg rel0, rel1, relb0, relb1, rel2, relb2;
  wire relx = WP ? rel2 : rel1, relbx = WP ? relb2 : relb1;   // after the bank's last read (WP: a cycle later)
  wire wb_d = wb ^ wdone;
  wire full0_d = (wdone && !wb) || (full0 && !(relx && !relbx));
  wire full1_d = (wdone && wb) || (full1 && !(relx && relbx));
  always @(posedge clk) begin
    rel0 <= go && last_sf && (nf == NF - 1) && (ox == OW - 1) && (oy == OH - 1);
    relb0 <= rb;
    rel1 <= rel0; relb1 <= relb0;
    rel2 <= rel1; relb2 <= relb1;
    rdy <= !rst && !(wb_d ? full1_d : full0_d);
    if (rst) begin
      rel0 <= 1'b0; rel1 <= 1'b0; rel2 <= 1'b0;
      full0 <= 1'b0; full1 <= 1'b0; wb <= 1'b0; wp <= 0; rb <= 1'b0; used <= 0;
      oy <= 0; ox <= 0; nf <= 0; ky <= 0; kx <= 0; cg <= 0; sf <= 0; wbase <= 0;
    end else begin
      if (relx) begin
        if (relbx) full1 <= 1'b0; else full0 <= 1'b0;
      end
      // writer
      if (wr) begin
        if (wlast) begin
          if (wb) full1 <= 1'b1; else full0 <= 1'b1;
          wb <= ~wb;
        end
        wp <= (wp == 2 * IWORDS - 1) ? {CW{1'b0}} : wp + 1'b1;
      end
      // credits: a group takes one when its first word issues, returns it when read out
      used <= used + ((go && sf == 0) ? 1'b1 : 1'b0) - (popd[CRD-1] ? 1'b1 : 1'b0);
      // reader
      if (go) begin
        if (last_sf) begin
          sf <= 0; cg <= 0; kx <= 0; ky <= 0;
          if (nf == NF - 1) begin
            nf <= 0; wbase <= 0;
            if (ox == OW - 1) begin
              ox <= 0;
              if (oy == OH - 1) begin
                oy <= 0;
                rb <= ~rb;   // the bank is released two cycles later, once its last read is done
              end else oy <= oy + 1;
            end else ox <= ox + 1;
          end else begin
            nf <= nf + 1; wbase <= wbase + SF;
          end
        end else begin
          sf <= sf + 1;
          if (cg == CG - 1) begin
            cg <= 0;
            if (TAPS > 1) ky <= ky + 1;     // TAPS = K: the next row of the window
            else if (kx == K - 1) begin kx <= 0; ky <= ky + 1; end
            else kx <= kx + 1;
          end else
            cg <= cg + 1;
        end
      end
    end
  end
endmodule
